"""Save and load ~200 MB of parameters + AdamW moments: hpcpipe HDF5 shards vs torch.save/load.

    python benchmarks/bench_checkpoint.py --rounds 5 [--mb 200] [--dir /tmp/ckbench]

hpcpipe's side is the real thing: save_checkpoint (one shard file, CRC-32 per dataset, fsync,
atomic rename, `latest`) and load_checkpoint (checksums verified) on MPI.COMM_SELF. torch's side
is torch.save of the same tensors (a dict) plus an fsync (so both are on disk when they return),
and torch.load. Interleaved, alternating order; medians; GB/s = bytes / seconds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from pathlib import Path

import torch
from mpi4py import MPI

from hpcpipe.checkpoint import Shard, load_checkpoint, save_checkpoint


def make_state(total_mb: int) -> dict[str, torch.Tensor]:
    """Parameters and two moments each, transformer-sized matrices, total_mb MiB of float32."""
    per = total_mb * 2**20 // 4 // 3  # parameter, exp_avg, exp_avg_sq
    gen = torch.Generator().manual_seed(0)
    state, left, i = {}, per, 0
    while left > 0:
        n = min(left, 1024 * 1024)
        for kind in ("", "optim.exp_avg/", "optim.exp_avg_sq/"):
            state[f"{kind}layers.{i}.weight"] = torch.randn(n, generator=gen)
        left -= n
        i += 1
    return state


def hpcpipe_save(state, root: Path, step: int) -> None:
    shards = [Shard(k, v, tuple(v.shape), (0,) * v.dim()) for k, v in state.items()]
    save_checkpoint(root, step, MPI.COMM_SELF, shards, True, "pp0_tp0", {"bench": True}, keep=1)


def hpcpipe_load(state, root: Path) -> None:
    wanted = [(k, tuple(v.shape), (0,) * v.dim(), tuple(v.shape)) for k, v in state.items()]
    load_checkpoint(root, wanted)


def torch_save(state, path: Path) -> None:
    with open(path, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())


def torch_load(path: Path) -> None:
    torch.load(path)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--dir", default="/tmp/hpcpipe-ckbench")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(args.dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    state = make_state(args.mb)
    nbytes = sum(v.numel() * v.element_size() for v in state.values())
    ops = {
        "hpcpipe save": lambda r: hpcpipe_save(state, work / "h5", r),
        "torch save": lambda r: torch_save(state, work / "state.pt"),
        "hpcpipe load": lambda r: hpcpipe_load(state, work / "h5"),
        "torch load": lambda r: torch_load(work / "state.pt"),
    }
    times = {k: [] for k in ops}
    for r in range(args.rounds + 1):
        pairs = [("hpcpipe save", "torch save"), ("hpcpipe load", "torch load")]
        for a, b in pairs:
            for name in (a, b) if r % 2 == 0 else (b, a):
                elapsed = timed(lambda n=name, step=r + 1: ops[n](step))
                if r:  # round 0 warms the page cache and the file system
                    times[name].append(elapsed)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{nbytes / 1e6:.0f} MB (parameters + AdamW moments), {args.rounds} rounds, medians")
    for op in ("save", "load"):
        ours, theirs = med[f"hpcpipe {op}"], med[f"torch {op}"]
        rate = f"{nbytes / ours / 1e9:.2f} GB/s vs {nbytes / theirs / 1e9:.2f} GB/s"
        print(f"  {op}: hpcpipe {ours:.3f} s, torch {theirs:.3f} s ({rate}): "
              f"{theirs / ours:.2f}x")  # fmt: skip
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
