"""Surviving failures: ULFM in-job recovery (shrink, re-plan, reload) and elastic layouts."""

from __future__ import annotations

import time

from mpi4py import MPI

from hpcpipe.config import Config
from hpcpipe.parallel import ulfm
from hpcpipe.train import elastic


def _mpi_failure(exc: BaseException | None, held: list) -> bool:
    """A process failure in the exception's cause chain (ULFM): reported as one, or any other
    MPI error while a held communicator is revoked or knows a failed member."""
    seen, mpi_error = set(), False
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if ulfm.is_process_failure(exc):
            return True
        mpi_error = mpi_error or isinstance(exc, MPI.Exception)
        exc = exc.__cause__ or exc.__context__
    return mpi_error and ulfm.failure_known(held)


def _held_comms(comm, grid) -> list:
    """Every communicator a rank of this job may be waiting on."""
    return [comm] + (grid.all_comms if grid else [])


def train_recovering(
    run, comm, config, metrics_path, echo, trace_path, resume, stop, init_from=None
) -> list[dict]:
    """run (train_on), and under ULFM: on a rank's death, shrink, re-plan, reload, carry on."""
    recoverable = ulfm.ulfm_available(comm)
    holder: dict = {}
    records: list[dict] = []
    while True:
        try:
            args = (metrics_path, echo, trace_path, resume, stop, holder, init_from)
            records += run(comm, config, *args)
            if holder.get("recovered"):
                ulfm.exit_without_finalize(comm)
            return records
        except BaseException as exc:
            if not (recoverable and _mpi_failure(exc, _held_comms(comm, holder.get("grid")))):
                raise
            holder["failed_at"] = time.perf_counter()
            holder["recovered"] = True
            comm, config = recover(comm, config, holder.get("grid"), echo)
            resume = "auto"


def recover(comm, config: Config, grid, echo):
    """Revoke everything, shrink to the survivors, agree, re-plan the layout for them."""
    timeout = config.parallel.timeout
    ulfm.revoke_all(_held_comms(comm, grid))
    survivors, failed = ulfm.shrink(comm, timeout)
    if ulfm.agree(survivors, 1, timeout) != 1:
        raise RuntimeError("survivors could not agree to continue after a failure")
    size = survivors.Get_size()
    config, note = elastic.replan(config, size)
    p = config.parallel
    if survivors.Get_rank() == 0:
        echo(f"hpcpipe: ULFM: ranks {failed} failed; {size} survivors carry on in this job")
        if note:
            echo(f"hpcpipe: {note}")
    if p.dp * p.pp * p.tp != size:
        # NOTE: continuing on a sub-communicator would leave ranks idle; restart instead.
        raise RuntimeError(f"no layout uses exactly the {size} survivors; relaunch the job")
    return survivors, config


def idle_until_done(comm) -> None:
    """Meet the idle ranks at the end without spinning (MPI_Finalize would busy-wait)."""
    from hpcpipe.parallel.p2p import wait_politely

    # NOTE: an idle rank may wait for the whole run; only a dead job ends it (mpiexec).
    request = comm.Ibarrier()
    wait_politely(request, float("inf"), lambda: "unreachable")


def elastic_layout(config: Config, comm, echo):
    """(config, communicator to train on): re-planned for the ranks present when elastic.

    Ranks beyond the new layout get None and sit the run out.
    """
    world = comm.Get_size()
    if not config.parallel.elastic:
        return config, comm
    config, note = elastic.replan(config, world)
    if not note:
        return config, comm
    if comm.Get_rank() == 0:
        echo(f"hpcpipe: {note}")
    p = config.parallel
    used = p.dp * p.pp * p.tp
    if used == world:
        return config, comm
    from mpi4py import MPI

    color = 0 if comm.Get_rank() < used else MPI.UNDEFINED
    active = comm.Split(color, comm.Get_rank())
    return config, (None if active == MPI.COMM_NULL else active)
