"""Launch real MPI jobs from tests (one mpiexec per group of cases: start-up costs seconds)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from hpcpipe.launch import mpi_env, mpiexec_command

ROOT = Path(__file__).resolve().parent.parent


def run_mpi(n: int, args: list[str], timeout: float = 600, env: dict | None = None):
    """Run `python ARGS` on n ranks; return the CompletedProcess (never hangs past timeout)."""
    cmd = mpiexec_command(n) + [sys.executable] + args
    return subprocess.run(
        cmd,
        cwd=ROOT,
        env=mpi_env({**mpi_env(), **(env or {})}),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
