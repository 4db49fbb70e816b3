"""Survive the death of a rank with ULFM (MPI User-Level Failure Mitigation, Open MPI 5).

Measured with the pip Open MPI 5.0.11 + mpi4py 4.1, 4 ranks on 2 cores, `mpiexec --with-ft ulfm`
(tests/mpi/ulfm_probe.py repeats the main case):

* A rank killed by SIGKILL: a neighbour's Test() on an Irecv/Isend to it (on a Cart Sub
  communicator) raises MPI.Exception ERR_PROC_FAILED (75) 10-25 ms later. Every member of a
  collective that includes the dead rank (Iallreduce, Ibarrier on the cart) also gets 75 on its
  own, 6-22 ms after the death. A rank whose pending operation involves only live peers (an Irecv
  from a live rank) is NOT told: it waits until its deadline unless someone revokes.
* Revoke() on a communicator makes every pending and later operation on it, on every rank, raise
  ERR_REVOKED (77) within ~1 ms. So one rank's failure report may reach another as 77 before
  that rank sees the 75 itself: treat 75, 76 and 77 alike.
* After Test() has raised, the request is gone: a second Test() returns True. Never retry it.
* Shrink() works on a revoked or unrevoked communicator (COMM_WORLD or the cart, both tried) in
  0.3-20 ms; Agree/Iagree work on the shrunk communicator and, after Ack_failed, on the old one.
  Create_cart + Sub + Split on the shrunk communicator and Isend/Irecv/Iallreduce on them work
  normally (Open MPI warns once that its 'basic' topo component is "not tested for post-failure
  operation": harmless here). mpiexec exits 0 when all survivors finish.
* Ishrink() is broken here: its request fails with ERR_INTERN (17) and the communicator it
  returned segfaults on first use. `shrink` therefore runs the blocking Shrink under a watchdog.
* SIGSTOP (a hung rank) is never detected by default: survivors wait until their deadline and a
  later Shrink blocks forever (`shrink` raises ULFMError at its timeout instead). With
  `--mca mpi_ft_detector true --mca mpi_ft_detector_period 0.5 --mca mpi_ft_detector_timeout 2`
  the stopped rank is reported as failed (75) 1.5 s after it stopped and recovery works, but
  mpiexec never exits: the stopped process stays in the job.
* Without `--with-ft ulfm` (even with `--mca mpi_ft_enable 1`) one dead rank kills the job (137).

Recovery protocol for the trainer (every survivor runs the same steps):

1. Detect: an MPI.Exception for which `is_process_failure` is True, from any wait (p2p, reduction,
   checkpoint barrier). A P2PTimeout is not a detected failure: without the heartbeat detector
   the silent rank cannot be shrunk away, so treat a timeout as fatal (die hard) unless the job
   runs with the detector options above (then the next operation reports 75 instead).
2. Revoke all: `revoke_all` on every communicator of the Grid (cart, dp/pp/tp Subs, embedding
   comm) and on the communicator the Grid was built from. This wakes the ranks that only wait on
   live peers; without it they sit until their deadline.
3. Shrink the communicator the Grid was built from (COMM_WORLD at first, the previous shrunk
   communicator after an earlier recovery): `new, failed = shrink(base, timeout)`. Do not shrink a
   Sub: every survivor must take part, and a Sub only holds some of them.
4. Agree: `agree(new, ok)` with ok=1 when this rank can continue (for example it still finds the
   checkpoint directory); if the result is 0, stop everywhere together.
5. Rebuild: free the old Grid (Free on a revoked communicator is allowed and local; the probe
   does it) and build a new Grid on `new`.
6. Re-plan the layout (dp/pp/tp degrees and stage partition) for new.Get_size() ranks; the same
   Topology no longer fits.
7. Reload the newest valid checkpoint (checkpoint.find_latest_valid) on the new layout: state
   held in memory by the dead rank is gone, and survivors' in-flight step is inconsistent.
8. Continue training from that step.

If `shrink` or `agree` raises ULFMError, or a second failure strikes during recovery, start again
from step 2 on the newest communicator; if that fails too, die hard (SIGKILL own process) so the
job ends instead of hanging in MPI_Finalize (see FIELD-NOTES.md).
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import os
import sys
import threading
import time

from mpi4py import MPI


class ULFMError(RuntimeError):
    """Recovery itself failed (timeout or a further failure); the rank should die hard."""


def _failure_classes() -> frozenset[int]:
    """Error classes that mean 'a process failed' (empty if this mpi4py lacks them)."""
    names = ("ERR_PROC_FAILED", "ERR_PROC_FAILED_PENDING", "ERR_REVOKED")
    return frozenset(getattr(MPI, n) for n in names if hasattr(MPI, n))


FAILURE_CLASSES = _failure_classes()


def _ompi_ft_enabled() -> bool:
    """Open MPI's own switch `ompi_ftmpi_enabled`, read from the loaded libmpi."""
    try:
        # NOTE: mpi4py loads libmpi privately (RTLD_LOCAL), so the symbol is not global; dlsym
        # on the mpi4py extension's handle also searches its dependencies, libmpi included.
        return bool(ctypes.c_bool.in_dll(ctypes.CDLL(MPI.__file__), "ompi_ftmpi_enabled").value)
    except (OSError, ValueError, AttributeError):
        return False


def ulfm_available(comm) -> bool:
    """Whether failures on `comm` can be survived: ULFM-capable Open MPI, started with FT on.

    Decided without communicating: HPCPIPE_ULFM=0/1 overrides; otherwise mpi4py must expose
    Comm.Revoke/Shrink/Agree, the library must be Open MPI with `ompi_ftmpi_enabled` true (set by
    `mpiexec --with-ft ulfm`, or `--mca mpi_ft_enable 1`), and `comm` must return errors rather
    than abort. MPICH, Open MPI without --with-ft and singletons give False. Caveat: mpi_ft_enable
    set without --with-ft also reads True, but then the runtime still kills the whole job on a
    death, so nothing is lost.
    """
    forced = os.environ.get("HPCPIPE_ULFM")
    if forced is not None:
        return forced.lower() in ("1", "true", "yes")
    if not all(hasattr(MPI.Comm, f) for f in ("Revoke", "Shrink", "Agree", "Ack_failed")):
        return False
    if "open mpi" not in MPI.Get_library_version().lower() or not _ompi_ft_enabled():
        return False
    handler = comm.Get_errhandler()
    try:
        return handler != MPI.ERRORS_ARE_FATAL and handler != MPI.ERRORS_ABORT
    finally:
        handler.Free()


def is_process_failure(exc: BaseException) -> bool:
    """True for an MPI error that reports a failed process or a revoked communicator."""
    return isinstance(exc, MPI.Exception) and exc.Get_error_class() in FAILURE_CLASSES


def failure_known(comms: list) -> bool:
    """Whether any of these communicators is revoked or knows of a failed member.

    NOTE: Open MPI's libnbc sometimes turns a revoke or a death that hits a non-blocking
    collective between rounds into MPI_ERR_OTHER ("Error in NBC_Start_round"), not 75/77 (seen
    once, in a CI run that killed a rank during a checkpoint's Ibarrier). So an MPI error of
    another class counts as a process failure when the communicators themselves say one happened.
    """
    for comm in comms:
        if comm is None or comm == MPI.COMM_NULL:
            continue
        try:
            if comm.Is_revoked():
                return True
            failed = comm.Get_failed()
            count = failed.Get_size()
            if failed != MPI.GROUP_EMPTY:
                failed.Free()
        except MPI.Exception:
            continue  # a communicator this MPI cannot query: ask the others
        if count > 0:
            return True
    return False


def revoke_all(comms: list) -> None:
    """Revoke every communicator given (None and COMM_NULL skipped, errors ignored)."""
    for comm in comms:
        if comm is None or comm == MPI.COMM_NULL:
            continue
        # Already revoked, or this MPI cannot: the others must still be revoked.
        with contextlib.suppress(MPI.Exception):
            comm.Revoke()


def _with_watchdog(fn, timeout: float, what: str):
    """Run a blocking MPI call on a helper thread; raise ULFMError if it outlasts `timeout`."""
    # NOTE: a blocking Shrink cannot be interrupted, and Ishrink is broken in Open MPI 5.0.11
    # (see the module docstring). A stuck call stays on its daemon thread; the caller must then
    # end the process hard. mpi4py initialises MPI with THREAD_MULTIPLE, which this needs.
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            box["error"] = exc

    thread = threading.Thread(target=run, name=f"ulfm-{what}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise ULFMError(
            f"{what} did not finish within {timeout:.0f} s: a rank is hung rather than dead "
            "(run with --mca mpi_ft_detector true) or missed the recovery; end this process"
        )
    if "error" in box:
        raise ULFMError(f"{what} failed: {box['error']}") from box["error"]
    return box["value"]


def _old_ranks(group, old_group) -> list[int]:
    """Ranks in `old_group` of the members of `group`."""
    return list(MPI.Group.Translate_ranks(group, list(range(group.Get_size())), old_group))


def shrink(comm, timeout: float) -> tuple[object, list[int]]:
    """Survivors' communicator (ranks renumbered, order kept) and the failed ranks of `comm`.

    Collective over all survivors of `comm`. The failed ranks come from comparing groups, not
    from Get_failed: the shrunk group is agreed by all, a local failure list may lag.
    """
    new = _with_watchdog(comm.Shrink, timeout, f"Shrink of {comm.Get_size()} ranks")
    old_group, new_group = comm.Get_group(), new.Get_group()
    gone = MPI.Group.Difference(old_group, new_group)
    try:
        return new, sorted(_old_ranks(gone, old_group))
    finally:
        for group in (gone, new_group, old_group):
            group.Free()


def _wait(request, deadline: float, what: str) -> None:
    """Test + growing sleep until done (busy-waiting starves oversubscribed ranks)."""
    delay = 2e-5
    while not request.Test():
        if time.monotonic() > deadline:
            raise ULFMError(f"{what} did not finish in time: a rank is hung or missed recovery")
        time.sleep(delay)
        delay = min(delay * 2, 1e-3)


def exit_without_finalize(comm, timeout: float = 60.0) -> None:
    """End a process that survived a failure: meet the other survivors on `comm`, then exit(0).

    NOTE: after a rank died, Open MPI 5.0.11's MPI_Finalize on the survivors sometimes waits
    forever: all of them sleep in ompi_mpi_finalize's fence (seen 1 run in ~5 under load, and 2
    of 12 runs of tests/mpi/ulfm_probe.py on an idle machine; gdb showed every survivor in
    usleep under ompi_mpi_finalize). The work is complete here, so leave without it; mpiexec
    still exits 0 when every survivor exits 0.
    """
    _wait(comm.Ibarrier(), time.monotonic() + timeout, "survivors' final barrier")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def agree(comm, flag: int, timeout: float = 300.0) -> int:
    """Fault-tolerant agreement: the bitwise AND of every survivor's `flag` (MPI_Comm_agree).

    Works on a freshly shrunk communicator and on an old one (failures are acknowledged first,
    else the agreement reports ERR_PROC_FAILED for them). A failure during the agreement raises
    ULFMError: revoke and shrink again.
    """
    comm.Ack_failed()
    buf = array.array("i", [int(flag)])
    try:
        _wait(comm.Iagree(buf), time.monotonic() + timeout, f"Agree over {comm.Get_size()} ranks")
    except MPI.Exception as exc:
        raise ULFMError(f"agreement interrupted by another failure: {exc}") from exc
    return buf[0]
