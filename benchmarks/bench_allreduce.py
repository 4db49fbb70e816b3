"""Data-parallel gradient Allreduce through hpcpipe's GradReducer vs raw mpi4py Allreduce.

    mpiexec -n 2 python benchmarks/bench_allreduce.py --rounds 7

Both reduce the same float32 bytes between 2 ranks: hpcpipe packs parameter gradients into
buckets, runs a non-blocking Allreduce per bucket and writes the mean back (what a training step
pays); raw is one blocking Allreduce(IN_PLACE) of a numpy buffer of the same size. Alternating
order per round; medians; GB/s = bytes / time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from mpi4py import MPI
from torch import nn

from hpcpipe.parallel.data_parallel import GradReducer

SIZES_MB = (4, 32, 128)


def make_params(total_mb: int) -> list[nn.Parameter]:
    """Transformer-like mix: a few big matrices and small vectors, total_mb MiB of float32."""
    n = total_mb * 2**20 // 4
    sizes = [n // 8] * 7
    sizes.append(n - sum(sizes))
    params = []
    for size in sizes:
        p = nn.Parameter(torch.zeros(size))
        p.grad = torch.ones(size)
        params.append(p)
    return params


def hpcpipe_reduce(reducer: GradReducer) -> None:
    # Every gradient is final at once (as after the last micro-batch): buckets launch in order.
    for bucket in reducer.buckets:
        for p in bucket.params:
            for _ in range(reducer.microbatches):
                reducer.grad_ready(p)
    reducer.finish()


def raw_reduce(comm, buf: np.ndarray) -> None:
    comm.Allreduce(MPI.IN_PLACE, [buf, MPI.FLOAT], op=MPI.SUM)


def timed(comm, fn, before=None) -> float:
    if before is not None:
        before()  # not timed: zeroing the gradient buckets belongs to the backward pass
    comm.Barrier()
    start = time.perf_counter()
    fn()
    return comm.allreduce(time.perf_counter() - start, op=MPI.MAX)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    rows = []
    for mb in SIZES_MB:
        params = make_params(mb)
        reducer = GradReducer(params, comm, microbatches=1)
        buf = np.ones(mb * 2**20 // 4, dtype=np.float32)
        runs = {
            "hpcpipe": lambda r=reducer: hpcpipe_reduce(r),
            "raw": lambda b=buf: raw_reduce(comm, b),
        }
        for fn in runs.values():  # warm-up
            timed(comm, fn)
        times = {k: [] for k in runs}
        for i in range(args.rounds):
            for name in list(runs) if i % 2 == 0 else list(runs)[::-1]:
                times[name].append(timed(comm, runs[name]))
        med = {k: statistics.median(v) for k, v in times.items()}
        nbytes = mb * 2**20
        rows.append((mb, nbytes / med["hpcpipe"] / 1e9, nbytes / med["raw"] / 1e9,
                     med["raw"] / med["hpcpipe"], len(reducer.buckets)))  # fmt: skip
    if comm.Get_rank() == 0:
        print(f"gradient Allreduce, {comm.Get_size()} ranks, {args.rounds} rounds, median GB/s")
        print(f"{'size':>8} {'hpcpipe':>9} {'raw':>9} {'ratio':>7} {'buckets':>8}")
        for mb, ours, raw, ratio, buckets in rows:
            print(f"{mb:>5} MiB {ours:>9.2f} {raw:>9.2f} {ratio:>7.3f} {buckets:>8}")


if __name__ == "__main__":
    main()
