"""4 ranks, pp=4; rank 2 SIGKILLs itself mid-exchange, survivors recover; new rank 0 writes JSON.

Run: mpiexec --with-ft ulfm -n 4 --oversubscribe python -m mpi4py tests/mpi/ulfm_probe.py OUT
Every wait has a deadline, so a regression raises (and aborts the job) instead of hanging.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import numpy as np
from mpi4py import MPI

from hpcpipe.parallel.grid import Grid, Topology
from hpcpipe.parallel.ulfm import (
    agree,
    exit_without_finalize,
    is_process_failure,
    revoke_all,
    shrink,
    ulfm_available,
)

VICTIM = 2
DEADLINE = 10.0
COUNT = 1 << 17  # 1 MiB of float64: above the eager limit, so a send to the dead rank pends


def wait(request, deadline: float) -> None:
    """Test + sleep (the trainer's wait_politely, without torch)."""
    while not request.Test():
        if time.monotonic() > deadline:
            raise TimeoutError("no failure report before the deadline")
        time.sleep(1e-3)


def exchange(grid: Grid, count: int) -> None:
    """One pipeline step: forward to the next stage, backward from it, then a grad Iallreduce."""
    pp, r, n = grid.pp_comm, grid.pp_rank, grid.pp_comm.Get_size()
    reqs = []
    if r > 0:
        reqs.append(pp.Irecv([np.empty(count), MPI.DOUBLE], source=r - 1, tag=1))
    if r < n - 1:
        reqs.append(pp.Isend([np.ones(count), MPI.DOUBLE], dest=r + 1, tag=1))
        reqs.append(pp.Irecv([np.empty(count), MPI.DOUBLE], source=r + 1, tag=2))
    if r > 0:
        reqs.append(pp.Isend([np.ones(count), MPI.DOUBLE], dest=r - 1, tag=2))
    deadline = time.monotonic() + DEADLINE
    for request in reqs:
        wait(request, deadline)
    wait(grid.cart.Iallreduce(MPI.IN_PLACE, [np.ones(4), MPI.DOUBLE]), deadline)


def detect(grid: Grid, die_at: float) -> tuple[float, int]:
    """Run the step that loses the victim; return (latency after its death, error class)."""
    try:
        exchange(grid, COUNT)
    except MPI.Exception as exc:
        if not is_process_failure(exc):
            raise
        return time.time() - die_at, exc.Get_error_class()
    raise RuntimeError("the step finished although a peer died")


def check_new_grid(new) -> dict:
    """Rebuild a cart on the survivors and prove all are there: sum of old ranks, ring p2p."""
    grid = Grid(new, Topology(pp=new.Get_size()))
    values = np.array([float(MPI.COMM_WORLD.Get_rank()), 1.0])
    deadline = time.monotonic() + DEADLINE
    wait(grid.cart.Iallreduce(MPI.IN_PLACE, [values, MPI.DOUBLE]), deadline)
    r, n = grid.pp_rank, grid.pp_comm.Get_size()
    got = np.zeros(1)
    recv = grid.pp_comm.Irecv([got, MPI.DOUBLE], source=(r - 1) % n, tag=3)
    send = grid.pp_comm.Isend([np.array([float(r)]), MPI.DOUBLE], dest=(r + 1) % n, tag=3)
    wait(recv, deadline)
    wait(send, deadline)
    grid.free()
    return {"sum": values[0], "count": values[1], "ring_ok": bool(got[0] == (r - 1) % n)}


def main(out: str) -> None:
    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    if not ulfm_available(world):
        raise SystemExit("ulfm_available() is False under mpiexec --with-ft ulfm")
    grid = Grid(world, Topology(pp=world.Get_size()))
    exchange(grid, 16)  # a healthy step first
    world.Barrier()
    die_at = time.time() + 0.3
    if rank == VICTIM:
        time.sleep(max(0.0, die_at - time.time()))
        os.kill(os.getpid(), signal.SIGKILL)
    latency, error_class = detect(grid, die_at)
    start = time.perf_counter()
    revoke_all([*grid.all_comms, world])
    new, failed = shrink(world, timeout=DEADLINE)
    agreed = agree(new, 1 if rank != 1 else 3, timeout=DEADLINE)
    grid.free()  # NOTE: freeing revoked communicators is allowed and local
    result = check_new_grid(new)
    recovery = time.perf_counter() - start
    reports = new.gather({"rank": rank, "latency": latency, "class": error_class}, root=0)
    if new.Get_rank() == 0:
        summary = {"failed": failed, "new_size": new.Get_size(), "agreed": agreed}
        summary |= {"recovery_seconds": recovery, "reports": reports, **result}
        with open(out, "w") as f:
            json.dump(summary, f, default=float)
    exit_without_finalize(new, timeout=DEADLINE)  # MPI_Finalize may hang after a death


if __name__ == "__main__":
    main(sys.argv[1])
