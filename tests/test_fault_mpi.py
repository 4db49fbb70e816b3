"""Failures and signals under mpiexec: no hangs, clean stops, restarts on fewer ranks."""

import json
import os
import signal
import subprocess
import sys
import time

import torch
from mpirun import ROOT, run_mpi

from hpcpipe.checkpoint.store import full_tensors
from hpcpipe.launch import mpi_env, mpiexec_command

TINY = ["--model.n_layers=4", "--model.d_model=16", "--model.n_heads=2", "--model.seq_len=8",
        "--train.global_batch=8", "--microbatches", "4", "--dtype", "float64"]  # fmt: skip


def train_args(run_dir, *extra):
    return ["-m", "hpcpipe", "train", *TINY, f"--checkpoint.dir={run_dir}", *extra]


def losses(path):
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines())}


def test_a_stopped_peer_fails_the_job_within_the_deadline(tmp_path):
    env = {"HPCPIPE_FAULT": "rank=1,step=2,signal=STOP"}
    start = time.monotonic()
    args = train_args(tmp_path / "run", "--pp", "2", "--steps", "5", "--parallel.timeout=4")
    proc = run_mpi(2, args, timeout=120, env=env)
    elapsed = time.monotonic() - start
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "world rank 0 failed" in output
    assert "from pipeline rank 1" in output and "within 4 s" in output
    assert "step 1" in output  # the step (0-based in the runtime) and the action are named
    assert elapsed < 40, f"took {elapsed:.0f} s"


def test_sigusr1_checkpoints_and_exits_99_then_resumes_exactly(tmp_path):
    reference = tmp_path / "reference.jsonl"
    ref = run_mpi(2, train_args(tmp_path / "ref", "--pp", "2", "--steps", "8", "--metrics",
                                str(reference)), timeout=300)  # fmt: skip
    assert ref.returncode == 0, ref.stderr
    run_dir, first = tmp_path / "run", tmp_path / "first.jsonl"
    cmd = (
        mpiexec_command(2)
        + [sys.executable]
        + train_args(
            run_dir, "--pp", "2", "--steps", "8", "--metrics", str(first), "--train.log_every=1"
        )
    )
    job = subprocess.Popen(cmd, cwd=ROOT, env=mpi_env(), stdout=subprocess.PIPE, text=True)
    for line in job.stdout:  # signal once training is under way
        if line.startswith("step "):
            break
    ranks = subprocess.run(["pgrep", "-f", f"checkpoint.dir={run_dir}"], capture_output=True,
                           text=True).stdout.split()  # fmt: skip
    ranks = [int(pid) for pid in ranks if int(pid) != job.pid]
    os.kill(ranks[-1], signal.SIGUSR1)  # what SLURM sends before the time limit: one rank
    rest, _ = job.communicate(timeout=120)
    assert job.returncode == 99, rest
    assert "stop signal: checkpointed step" in rest
    stopped_at = max(losses(first))
    assert (run_dir / f"step_{stopped_at}").is_dir()
    again = run_mpi(2, train_args(run_dir, "--pp", "2", "--steps", "8", "--resume", "auto",
                                  "--metrics", str(first)), timeout=300)  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert losses(first) == losses(reference)  # every step, bit for bit


def test_restart_on_fewer_ranks_after_a_kill(tmp_path):
    run_dir = tmp_path / "run"
    env = {"HPCPIPE_FAULT": "rank=2,step=3"}
    dead = run_mpi(4, train_args(run_dir, "--pp", "4", "--steps", "5",
                                 "--checkpoint.every=1"), timeout=300, env=env)  # fmt: skip
    assert dead.returncode != 0
    assert (run_dir / "latest").read_text().strip() == "step_2"
    # The relaunch on 3 ranks re-plans pp=4 -> pp=3 and carries on from step 2.
    again = run_mpi(3, train_args(run_dir, "--pp", "4", "--steps", "5", "--resume", "auto",
                                  "--parallel.elastic=true", "--checkpoint.at_end=true"),
                    timeout=300)  # fmt: skip
    assert again.returncode == 0, again.stdout + again.stderr
    assert "elastic re-plan for 3 ranks" in again.stdout and "pp=3" in again.stdout
    # A clean run from the same checkpoint on the same smaller layout ends in the same place.
    clean_dir = tmp_path / "clean"
    clean_dir.mkdir()
    (clean_dir / "step_2").symlink_to(run_dir / "step_2", target_is_directory=True)
    (clean_dir / "latest").write_text("step_2\n")
    clean = run_mpi(3, train_args(clean_dir, "--pp", "3", "--steps", "5", "--resume", "auto",
                                  "--checkpoint.at_end=true"), timeout=300)  # fmt: skip
    assert clean.returncode == 0, clean.stderr
    _, got = full_tensors(run_dir / "step_5", keep=lambda n: not n.startswith("optim."))
    _, want = full_tensors(clean_dir / "step_5", keep=lambda n: not n.startswith("optim."))
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
