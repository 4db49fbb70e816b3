"""Training runs a schedule from a CSV file (torch's dump) and zb-auto rebuilt for the costs
its first step measured, equal to one process in float64."""

import json

import pytest
from mpirun import run_mpi
from test_schedule_csv import stand_ins

TINY = ["--model.n_layers=4", "--model.d_model=16", "--model.n_heads=2", "--model.seq_len=8",
        "--train.global_batch=4", "--train.dtype=float64", "--steps=3",
        "--train.eval_every=0"]  # fmt: skip


def losses(ranks: int, flags: list[str], tmp_path) -> tuple[list[float], str]:
    metrics = tmp_path / f"metrics-{ranks}-{len(flags)}.jsonl"
    args = ["-m", "hpcpipe", "train", *TINY, "--microbatches=4", *flags, "--metrics", str(metrics)]
    proc = run_mpi(ranks, args, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [json.loads(line)["loss"] for line in metrics.read_text().splitlines()], proc.stdout


def test_training_runs_torchs_interleaved_zero_bubble_dump_equal_to_one_process(tmp_path):
    schedules = pytest.importorskip("torch.distributed.pipelining.schedules")
    path = tmp_path / "torch-izb.csv"
    schedules.ScheduleInterleavedZeroBubble(stand_ins(2, 2), 4)._dump_csv(str(path))
    serial, _ = losses(1, [], tmp_path)
    flags = ["--pp=2", "--schedule.virtual=2", f"--schedule.csv={path}"]
    piped, out = losses(2, flags, tmp_path)
    assert f"schedule {path}" in out
    assert piped == pytest.approx(serial, rel=1e-12, abs=0)


def test_zb_auto_is_rebuilt_for_its_first_steps_costs_and_trains_equal(tmp_path):
    serial, _ = losses(1, [], tmp_path)
    piped, out = losses(2, ["--pp=2", "--schedule=zb-auto", "--schedule.memory_limit=2"], tmp_path)
    assert out.count("hpcpipe: zb-auto rebuilt for the costs step 1 measured: T_F ") == 1
    assert piped == pytest.approx(serial, rel=1e-12, abs=0)
