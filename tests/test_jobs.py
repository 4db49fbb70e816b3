"""The cluster job scripts: syntax, shellcheck, the PBS dry run, a real SLURM job on localhost and
the local relaunch loop surviving a killed rank.

The SLURM test starts a one-node cluster with jobs/local/start-slurm.sh (apt-get installs slurm
and munge when missing, as root); deselect it with `-m "not slurm"`.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
SCRIPTS = sorted(
    [*ROOT.glob("jobs/local/*.sh"), *ROOT.glob("jobs/slurm/*.sbatch"), *ROOT.glob("jobs/pbs/*.pbs")]
)
TINY = ["--model.n_layers=2", "--model.d_model=32", "--model.n_heads=2", "--model.seq_len=16",
        "--train.global_batch=8", "--microbatches", "4"]  # fmt: skip

slurm = pytest.mark.slurm  # registered in tests/conftest.py


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("HPCPIPE_FAULT", None)
    env.update(extra)
    return env


def test_scripts_found():
    names = {p.relative_to(ROOT).as_posix() for p in SCRIPTS}
    assert {"jobs/slurm/train.sbatch", "jobs/pbs/train.pbs", "jobs/local/resilient.sh",
            "jobs/local/start-slurm.sh", "jobs/local/mpirun.sh"} <= names  # fmt: skip


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_bash_syntax(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_shellcheck(script):
    if shutil.which("shellcheck") is None:
        pytest.skip(
            "shellcheck not installed (apt-get install -y --no-install-recommends shellcheck)"
        )
    proc = subprocess.run(
        ["shellcheck", "--shell=bash", str(script)], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _pbs_dry_run(args: list[str], **env: str) -> list[str]:
    proc = subprocess.run(
        ["bash", "jobs/pbs/train.pbs", *args],
        cwd=ROOT,
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout  # only the command
    return shlex.split(lines[0])


def test_pbs_dry_run_prints_the_mpiexec_command(tmp_path):
    nodefile = tmp_path / "nodes"
    nodefile.write_text("node1\n" * 4 + "node2\n" * 4)
    cmd = _pbs_dry_run(
        ["--dry-run", "--steps", "7"], PBS_NODEFILE=str(nodefile), TP="2", CKPT_DIR="ck"
    )
    assert Path(cmd[0]).name in ("mpiexec", "mpirun")
    assert cmd[cmd.index("-n") + 1] == "8"
    assert str(nodefile) in cmd  # --hostfile (Open MPI) or -f (MPICH)
    train = cmd[cmd.index("hpcpipe") :]
    assert train[:2] == ["hpcpipe", "train"]
    for flag, value in [("--dp", "1"), ("--pp", "4"), ("--tp", "2"), ("--resume", "auto")]:
        assert train[train.index(flag) + 1] == value
    assert "--parallel.elastic=true" in train and "--checkpoint.dir=ck" in train
    assert train[-2:] == ["--steps", "7"]  # the script's arguments come last, so they win


def test_pbs_dry_run_from_environment():
    cmd = _pbs_dry_run([], DRY_RUN="1", NP="2", CONFIG="", EXTRA="--steps 3 --seed 5")
    assert cmd[cmd.index("-n") + 1] == "2"
    assert "--config" not in cmd
    assert cmd[cmd.index("--pp") + 1] == "2"
    assert cmd[-4:] == ["--steps", "3", "--seed", "5"]


def test_pbs_refuses_a_layout_that_does_not_divide():
    proc = subprocess.run(
        ["bash", "jobs/pbs/train.pbs", "--dry-run"],
        cwd=ROOT,
        env=_env(NP="3", TP="2"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "not a multiple" in proc.stderr


# ---------------------------------------------------------------------------------------------
# SLURM on localhost


@pytest.fixture(scope="session")
def slurm_conf():
    """Start (or find) the one-node SLURM of jobs/local/start-slurm.sh; its SLURM_CONF."""
    if os.environ.get("SLURM_CONF") and shutil.which("sbatch"):
        probe = subprocess.run(["sinfo", "-h"], capture_output=True, text=True, timeout=30)
        if probe.returncode == 0 and probe.stdout.strip():
            yield os.environ["SLURM_CONF"]  # a cluster is already there: use it
            return
    if shutil.which("sbatch") is None and (os.geteuid() != 0 or shutil.which("apt-get") is None):
        pytest.skip("no sbatch, and slurm cannot be installed here (needs root and apt-get)")
    try:
        proc = subprocess.run(
            ["bash", "jobs/local/start-slurm.sh"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
    except subprocess.TimeoutExpired:
        pytest.skip("jobs/local/start-slurm.sh did not finish in 600 s")
    if proc.returncode != 0:
        pytest.skip(
            f"jobs/local/start-slurm.sh failed (exit {proc.returncode}): {proc.stderr[-800:]}"
        )
    match = re.search(r"export SLURM_CONF=(\S+)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    yield match.group(1)
    if "already running" not in proc.stderr:  # stop the daemons this session started
        subprocess.run(["bash", "jobs/local/start-slurm.sh", "stop"], cwd=ROOT, timeout=60)


def _job_state(job: str, env: dict[str, str]) -> str:
    out = subprocess.run(
        ["scontrol", "show", "job", job], capture_output=True, text=True, env=env, timeout=30
    ).stdout
    match = re.search(r"JobState=(\S+)", out)
    return match.group(1) if match else "UNKNOWN"


@slurm
def test_slurm_job_trains_and_checkpoints(slurm_conf, tmp_path):
    env = _env(SLURM_CONF=slurm_conf)
    out = tmp_path / "job-%j.out"
    ckpt = tmp_path / "ckpt"
    exports = f"ALL,CONFIG=,CKPT_DIR={ckpt},CKPT_EVERY=2"
    cmd = ["sbatch", "--parsable", "--ntasks=2", "--time=00:05:00", f"--chdir={ROOT}",
           f"--output={out}", f"--export={exports}", "jobs/slurm/train.sbatch",
           *TINY, "--steps", "4"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job = proc.stdout.strip().split(";")[0]
    log = tmp_path / f"job-{job}.out"

    deadline = time.monotonic() + 180
    state = "PENDING"
    while time.monotonic() < deadline:
        state = _job_state(job, env)
        if state not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED"):
            break
        time.sleep(1)
    else:
        subprocess.run(["scancel", job], env=env, timeout=30)
        pytest.fail(
            f"job {job} still {state} after 180 s:\n{log.read_text() if log.exists() else ''}"
        )

    text = log.read_text() if log.exists() else "(no output file)"
    assert state == "COMPLETED", f"job {job} ended {state}:\n{text[-4000:]}"
    for step in range(1, 5):
        assert f"step     {step}/4" in text, text[-4000:]
    assert "dp=1 pp=2 tp=1" in text
    assert "training finished" in text
    assert (ckpt / "step_4").is_dir() or (ckpt / "step_2").is_dir(), sorted(ckpt.iterdir())


# ---------------------------------------------------------------------------------------------
# The local relaunch loop


def test_resilient_relaunches_on_fewer_ranks_after_a_killed_rank(tmp_path):
    ckpt = tmp_path / "ckpt"
    env = _env(HPCPIPE_FAULT="rank=1,step=2,signal=KILL", HPCPIPE_FAULT_FIRST_ONLY="1")
    args = [*TINY, "--pp", "2", "--steps", "4", f"--checkpoint.dir={ckpt}", "--checkpoint.every=1"]
    proc = subprocess.run(
        ["bash", "jobs/local/resilient.sh", "2", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )
    text = proc.stdout
    assert proc.returncode == 0, text[-4000:]
    assert "attempt 1: 2 rank(s)" in text
    assert "relaunching on 1 rank(s)" in text
    assert "attempt 2: 1 rank(s)" in text
    assert "unsetting HPCPIPE_FAULT" in text
    assert "finished the training (exit 0) on 1 rank(s)" in text
    second = text[text.index("attempt 2: 1 rank(s)") :]
    # the second attempt resumed from a checkpoint written before the fault, and did the rest
    assert re.search(r"resumed from .*step_[12]", second), second
    assert "step     1/4" not in second
    for step in (3, 4):
        assert f"step     {step}/4" in second, second
    assert (ckpt / "step_4").is_dir()
