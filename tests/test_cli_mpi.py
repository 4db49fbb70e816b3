"""The `hpcpipe` command under mpiexec: training end to end, failures that end the job."""

import json
import subprocess
import sys
import time

import pytest
from mpirun import run_mpi

from hpcpipe.config import all_keys
from hpcpipe.pipeline.schedule import SCHEDULES

TINY = [
    "--model.n_layers=2",
    "--model.d_model=32",
    "--model.n_heads=2",
    "--model.seq_len=16",
    "--train.global_batch=8",
]


def test_train_on_prepared_text_writes_metrics(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("It was the best of times, it was the worst of times. " * 400)
    tokens = tmp_path / "tokens.h5"
    prep = subprocess.run(
        [sys.executable, "-m", "hpcpipe", "data", "prepare", "--out", str(tokens), str(text)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert prep.returncode == 0, prep.stderr
    config = tmp_path / "run.toml"
    config.write_text('[schedule]\nname = "gpipe"\nmicrobatches = 4\n[train]\nsteps = 3\n')
    metrics = tmp_path / "metrics.jsonl"
    args = ["-m", "hpcpipe", "train", "--config", str(config), "--pp", "2", *TINY]
    args += [f"--data.path={tokens}", "--metrics", str(metrics), "--train.peak_tflops=0.5"]
    proc = run_mpi(2, args, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "schedule gpipe, M=4" in proc.stdout
    assert proc.stdout.count("step ") == 3  # progress from rank 0 only
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert {"step", "loss", "tokens_per_s", "bubble"} <= r.keys()
        assert 0.0 <= r["bubble"] < 1.0 and r["tokens_per_s"] > 0
    assert records[-1]["loss"] < records[0]["loss"]
    # TINY's model FLOPs: Megatron's 72 B s l h^2 (1 + s/6h + V/12hl), V = 256 bytes, plus the
    # 3 B s h of GPT-2's position add; per rank of the 2, over the given 0.5 TFLOP/s peak
    B, s, l, h, V = 8, 16, 2, 32, 256
    step_flops = 72 * B * s * l * h * h * (1 + s / (6 * h) + V / (12 * h * l)) + 3 * B * s * h
    for r in records:
        tflops = step_flops / r["step_time"] / 2 / 1e12
        assert r["tflops_per_rank"] == pytest.approx(tflops, rel=1e-9)
        assert r["mfu"] == pytest.approx(r["tflops_per_rank"] / 0.5, rel=1e-9)
    assert proc.stdout.count(" TFLOP/s/rank | mfu ") == 3


def test_a_failing_rank_ends_the_whole_job_quickly():
    start = time.monotonic()
    args = ["-m", "hpcpipe", "train", "--pp", "4", "--steps", "50", *TINY]
    proc = run_mpi(4, [*args, "--debug.fail_at=2:1:2F1"], timeout=120)
    elapsed = time.monotonic() - start
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "world rank 2 failed" in output
    assert "action 2F1" in output and "injected failure" in output
    assert elapsed < 30, f"job took {elapsed:.1f} s to end"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--pp", "3"], "dp=1 x pp=3 x tp=1 = 3 but the job has 2 MPI processes"),
        (["--pp", "2", "--microbatches", "3"], "valid microbatches: [1, 2, 4, 8]"),
    ],
)
def test_bad_configuration_is_reported_on_every_rank(flags, message):
    proc = run_mpi(2, ["-m", "hpcpipe", "train", *TINY, *flags], timeout=120)
    assert proc.returncode != 0
    for rank in range(2):
        assert f"configuration error (rank {rank})" in proc.stderr
    assert proc.stderr.count(message) == 2


def test_help_documents_every_option():
    proc = subprocess.run(
        [sys.executable, "-m", "hpcpipe", "train", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0
    for key in all_keys():
        assert f"--{key}" in proc.stdout
    for flag in ("--pp", "--tp", "--dp", "--schedule", "--microbatches", "--steps", "--dtype"):
        assert flag in proc.stdout
    assert "--metrics" in proc.stdout and "--config" in proc.stdout
    for name in SCHEDULES:  # the valid values of schedule.name, not just the key
        assert name in proc.stdout


def test_schedule_command_prints_the_grid():
    proc = subprocess.run(
        [sys.executable, "-m", "hpcpipe", "schedule", "--schedule", "1f1b", "--stages", "2",
         "--microbatches", "3"],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1].startswith("rank 0 | 0F0 0F1")


def test_trace_of_a_zero_bubble_run_and_prediction(tmp_path):
    trace = tmp_path / "trace.json"
    args = ["-m", "hpcpipe", "train", "--pp", "2", "--steps", "2", "--schedule", "zb-h1"]
    proc = run_mpi(2, [*args, "--microbatches", "4", *TINY, "--trace", str(trace)], 300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(trace.read_text())
    events = data["traceEvents"]
    slices = [e for e in events if e["ph"] == "X"]
    assert len(slices) == 2 * 4 * 3  # ranks x micro-batches x (F, B, W)
    assert {e["pid"] for e in slices} == {0, 1}  # one row per rank
    flows = [e for e in events if e["ph"] in ("s", "f")]
    assert len(flows) == 2 * (4 + 4)  # every forward and backward message, both ends
    assert 0 <= data["hpcpipe"]["measured_bubble"] < 1
    fit = subprocess.run(
        [sys.executable, "-m", "hpcpipe", "schedule", "--fit", str(trace), "--schedule",
         "1f1b", "--microbatches", "8", "--format", "json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert fit.returncode == 0, fit.stderr
    predicted = json.loads(fit.stdout)
    assert predicted["M"] == 8 and predicted["step_time"] > 0
    assert predicted["measured"]["schedule"] == "zb-h1"
    picture = tmp_path / "measured.png"
    drawn = subprocess.run(
        [sys.executable, "-m", "hpcpipe", "schedule", "--measured", str(trace), "--format",
         "png", "--out", str(picture)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert drawn.returncode == 0, drawn.stderr
    assert picture.stat().st_size > 1000


def test_resume_auto_falls_back_past_a_damaged_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    args = ["-m", "hpcpipe", "train", "--pp", "2", *TINY, f"--checkpoint.dir={run_dir}"]
    first = run_mpi(2, [*args, "--steps", "4", "--checkpoint.every=2"], timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    assert (run_dir / "latest").read_text().strip() == "step_4"
    shard = run_dir / "step_4" / "pp1_tp0.h5"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a torn write
    again = run_mpi(2, [*args, "--steps", "5", "--resume", "auto"], timeout=300)
    output = again.stdout + again.stderr
    assert again.returncode == 0, output
    assert "warning" in output and "step_4" in output
    assert "resumed from" in output and "step_2 at step 2" in output
    assert again.stdout.count("step ") >= 3  # steps 3, 4 and 5 ran again


def test_topology_under_mpiexec_names_hosts():
    proc = run_mpi(4, ["-m", "hpcpipe", "topology", "--dp", "2", "--pp", "2"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].split() == ["world_rank", "dp", "pp", "tp", "host"]
    rows = [line.split()[:4] for line in lines[1:5]]
    assert rows == [["0", "0", "0", "0"], ["1", "0", "1", "0"], ["2", "1", "0", "0"],
                    ["3", "1", "1", "0"]]  # fmt: skip
