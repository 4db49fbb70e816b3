"""ULFM recovery with real processes: a rank dies by SIGKILL, the other three carry on."""

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mpi4py import MPI

from hpcpipe.launch import find_mpiexec, mpi_env, mpiexec_command
from hpcpipe.parallel.ulfm import FAILURE_CLASSES, is_process_failure, revoke_all, ulfm_available

ROOT = Path(__file__).resolve().parent.parent


def ulfm_skip_reason() -> str | None:
    """Why this machine cannot run a ULFM job, or None when it can."""
    try:
        exe = find_mpiexec()
        version = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"no usable mpiexec: {exc}"
    found = re.search(r"open mpi\)?\s*(\d+)\.", version.stdout.lower())
    if not found or int(found.group(1)) < 5:
        return f"ULFM needs Open MPI 5+; `{exe} --version` says {version.stdout.strip()[:80]!r}"
    info = Path(exe).with_name("ompi_info")
    info = str(info) if info.exists() else shutil.which("ompi_info")
    if not info:
        return "no ompi_info beside mpiexec or on PATH to confirm FT MPI support"
    text = subprocess.run([info], capture_output=True, text=True, timeout=60).stdout
    if not re.search(r"FT MPI support:\s*yes", text):
        return f"{info} does not report 'FT MPI support: yes' (Open MPI built without ULFM)"
    return None


def test_sigkilled_rank_is_shrunk_away_and_survivors_continue(tmp_path):
    reason = ulfm_skip_reason()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "ulfm.json"
    cmd = mpiexec_command(4, ["--with-ft", "ulfm"])
    cmd += [sys.executable, "-m", "mpi4py", "tests/mpi/ulfm_probe.py", str(out)]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=mpi_env(), capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert elapsed < 30, f"recovery job took {elapsed:.1f} s"
    got = json.loads(out.read_text())
    assert got["failed"] == [2]
    assert got["new_size"] == 3
    assert got["agreed"] == 1  # AND of 1, 3, 1
    assert got["sum"] == 0 + 1 + 3 and got["count"] == 3
    assert got["ring_ok"] is True
    reports = {r["rank"]: r for r in got["reports"]}
    assert sorted(reports) == [0, 1, 3]
    for report in reports.values():
        assert report["class"] in FAILURE_CLASSES
        assert report["latency"] < 5.0, report


def test_singleton_has_no_ulfm_and_plain_errors_are_not_failures():
    assert ulfm_available(MPI.COMM_WORLD) is False  # pytest is not under mpiexec --with-ft
    assert is_process_failure(MPI.Exception(MPI.ERR_TRUNCATE)) is False
    assert is_process_failure(MPI.Exception(MPI.ERR_REVOKED)) is True
    assert is_process_failure(TimeoutError()) is False
    revoke_all([None, MPI.COMM_NULL])  # skipped, no error


def revoked_self():
    """A real communicator of this process, revoked (Open MPI revokes even without FT)."""
    comm = MPI.COMM_SELF.Dup()
    comm.Set_errhandler(MPI.ERRORS_RETURN)
    comm.Revoke()
    return comm


def test_another_mpi_error_counts_as_a_failure_only_if_a_communicator_knows_of_one():
    """libnbc may report a revoke mid-collective as MPI_ERR_OTHER: ask the communicators."""
    from hpcpipe.train.recovery import _mpi_failure

    other = MPI.Exception(MPI.ERR_OTHER)
    assert not _mpi_failure(other, [MPI.COMM_WORLD])  # nothing failed: a real error, raise it
    revoked = revoked_self()
    try:
        assert _mpi_failure(other, [MPI.COMM_WORLD, revoked])
        wrapped = RuntimeError("action 1F2 failed")
        wrapped.__cause__ = other
        assert _mpi_failure(wrapped, [revoked])  # found through the cause chain
        assert not _mpi_failure(ValueError("bad shape"), [revoked])  # not an MPI error at all
    finally:
        revoked.Free()
    if FAILURE_CLASSES:
        reported = MPI.Exception(next(iter(FAILURE_CLASSES)))
        assert _mpi_failure(reported, [MPI.COMM_WORLD])  # reported as a failure: always one
