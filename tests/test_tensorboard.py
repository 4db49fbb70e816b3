"""Logs people read: TensorBoard event files from rank 0, and the progress line's ETA."""

import json
import math

import pytest
from mpirun import run_mpi

from hpcpipe.train import logs
from hpcpipe.train.loop import format_record

TINY = ["--model.n_layers=2", "--model.d_model=32", "--model.n_heads=2", "--model.seq_len=16",
        "--train.global_batch=8", "--steps", "3"]  # fmt: skip


def _scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every point
    events.Reload()
    return {tag: events.Scalars(tag) for tag in events.Tags()["scalars"]}


def test_train_writes_tensorboard_events_on_rank_0(tmp_path):
    pytest.importorskip("tensorboard")
    board, metrics = tmp_path / "tb", tmp_path / "metrics.jsonl"
    args = ["-m", "hpcpipe", "train", "--pp", "2", *TINY, "--tensorboard", str(board)]
    args += ["--metrics", str(metrics), f"--checkpoint.dir={tmp_path / 'ckpt'}"]
    args += ["--train.eval_every=2", "--train.eval_batches=1"]  # val_loss at steps 2 and 3
    proc = run_mpi(2, args, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(list(board.glob("events.out.tfevents.*"))) == 1  # rank 0 only
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    scalars = _scalars(board)
    for tag in ("loss", "lr", "tokens_per_s", "grad_norm", "bubble", "step_time"):
        assert [e.step for e in scalars[tag]] == [1, 2, 3], tag
        for event, record in zip(scalars[tag], records, strict=True):
            assert math.isclose(event.value, record[tag], rel_tol=1e-6), tag  # stored as float32
    assert {"memory/total", "memory/params", "memory/activations"} <= scalars.keys()
    assert [e.step for e in scalars["val_loss"]] == [2, 3]
    assert math.isclose(scalars["val_loss"][-1].value, records[-1]["val_loss"], rel_tol=1e-6)
    assert "loss_scale" not in scalars  # float32: there is none
    progress = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert len(progress) == 3
    for line in progress:
        assert "tok/s" in line and " | step_time " in line and " | eta " in line


def test_tensorboard_missing_is_a_clear_configuration_error():
    # sys.modules[name] = None makes `import tensorboard` fail, as an environment without it
    code = (
        "import sys; sys.modules['tensorboard'] = None; from hpcpipe.cli.main import main; "
        f"sys.exit(main(['train', '--tensorboard', 'tb', *{TINY!r}]))"
    )
    proc = run_mpi(1, ["-c", code], timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "configuration error (rank 0)" in proc.stderr
    assert "pip install tensorboard" in proc.stderr


def test_scalars_flatten_the_record():
    record = {"step": 4, "loss": 2.5, "grad_norm": None, "skipped": False, "val_loss": 2.75,
              "memory": {"params": 10, "total": 30}, "loss_scale": 1024.0, "name": "x"}  # fmt: skip
    assert logs.scalars(record) == {"loss": 2.5, "val_loss": 2.75, "memory/params": 10.0,
                                    "memory/total": 30.0, "loss_scale": 1024.0}  # fmt: skip


@pytest.mark.parametrize(
    "seconds, text",
    [(0, "0s"), (0.9, "0s"), (45, "45s"), (60, "1m00s"), (192, "3m12s"), (3599, "59m59s"),
     (3600, "1h00m"), (3900, "1h05m"), (86400 * 2 + 3 * 3600 + 59, "2d03h"), (-5, "0s")],
)  # fmt: skip
def test_format_duration(seconds, text):
    assert logs.format_duration(seconds) == text


def test_eta_is_remaining_steps_times_the_moving_average():
    now = [0.0]
    eta = logs.Eta(steps=100, window=2, clock=lambda: now[0])
    assert eta.update(1, 2.0) == 99 * 2.0  # no earlier update: the step's own time
    now[0] = 4.0
    assert eta.update(2, 2.0) == 98 * 3.0  # the mean of 2 and 4 (wall time since the last)
    now[0] = 10.0
    assert eta.update(3, 2.0) == 97 * 5.0  # window 2: the first step dropped out
    assert eta.update(100, 2.0) == 0.0


def test_progress_line_keeps_its_fields_and_shows_step_time_and_eta():
    record = {"step": 7, "loss": 3.25, "lr": 1e-3, "grad_norm": None, "tokens_per_s": 12345.6,
              "bubble": 0.25, "step_time": 0.0456, "loss_scale": 512.0}  # fmt: skip
    line = format_record(record, 60, eta=192.0)
    for field in ("step     7/60", "loss 3.2500", "grad_norm skipped (overflow)", "12,346 tok/s",
                  "bubble 0.250", "step_time 46 ms", "loss scale 512", "eta 3m12s"):  # fmt: skip
        assert field in line, (field, line)
    slow = format_record({**record, "grad_norm": 1.5, "step_time": 2.5}, 60)
    assert "grad_norm 1.500" in slow and "step_time 2.50 s" in slow and "eta" not in slow
    assert line.count("step ") == 1  # tests count progress lines by "step "
