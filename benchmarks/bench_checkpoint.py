"""Save and load ~200 MB of parameters + AdamW moments: hpcpipe HDF5 shards vs torch.save/load.

    python benchmarks/bench_checkpoint.py --rounds 5 [--mb 200] [--dir /tmp/ckbench]

hpcpipe's side is the real thing: save_checkpoint (one shard file, XXH3-64 per dataset, fsync,
atomic rename, `latest`) and load_checkpoint (checksums verified) on MPI.COMM_SELF. torch's side
is torch.save of the same tensors (a dict) plus an fsync (so both are on disk when they return),
and torch.load. Interleaved, alternating order; medians; GB/s = bytes / seconds.

Loads run in a fresh process each (timed inside it, around the load call only), as a resume
does: loading again in the process that just freed the previous load's tensors measures the
memory allocator's reuse of warm pages more than the load. Each load process first touches and
frees 1.25x the checkpoint's size, see load_worker.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from mpi4py import MPI

from hpcpipe.checkpoint.format import Shard
from hpcpipe.checkpoint.store import load_checkpoint, save_checkpoint, wait_for_pruning


def state_shapes(total_mb: int) -> dict[str, tuple[int, ...]]:
    """Parameters and two moments each, transformer-sized, total_mb MiB of float32."""
    per = total_mb * 2**20 // 4 // 3  # parameter, exp_avg, exp_avg_sq
    shapes, left, i = {}, per, 0
    while left > 0:
        n = min(left, 1024 * 1024)
        for kind in ("", "optim.exp_avg/", "optim.exp_avg_sq/"):
            shapes[f"{kind}layers.{i}.weight"] = (n,)
        left -= n
        i += 1
    return shapes


def make_state(total_mb: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(shape, generator=gen) for k, shape in state_shapes(total_mb).items()}


def hpcpipe_save(state, root: Path, step: int) -> None:
    shards = [Shard(k, v, tuple(v.shape), (0,) * v.dim()) for k, v in state.items()]
    save_checkpoint(root, step, MPI.COMM_SELF, shards, True, "pp0_tp0", {"bench": True}, keep=1)


def hpcpipe_load(shapes: dict, root: Path, into: dict | None = None) -> None:
    wanted = [(k, shape, (0,) * len(shape), shape) for k, shape in shapes.items()]
    load_checkpoint(root, wanted, into=into)


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


LOADS = ("hpcpipe", "hpcpipe-new", "torch", "torch-copy")


def timed_save(fn) -> float:
    """Seconds until save returns; then wait for the old step's background deletion.

    NOTE: save_checkpoint retires the previous step on a helper thread (training goes on
    meanwhile); waiting here keeps that deletion out of the next contender's timing.
    torch.save's truncation of its old file happens inside its own timing.
    """
    elapsed = timed(fn)
    wait_for_pruning()
    return elapsed


def load_worker(kind: str, work: Path, total_mb: int) -> None:
    """In a fresh process: time one load, print the seconds."""
    torch.set_num_threads(1)
    shapes = state_shapes(total_mb)
    # NOTE: on this VM a fresh process's first touch of memory costs either ~0.4 or ~2 ms/MB,
    # by luck, which swung single loads of either side between 0.1 and 0.4 s. Touching (and
    # freeing) a bit more than the load needs first makes both sides pay the cheap rate.
    torch.ones(total_mb * 5 // 4 * 2**20, dtype=torch.uint8)
    # A resume's tensors exist before the load (the model, and AdamW state that
    # train_state.restore makes): allocated and touched outside the timing.
    existing = {k: torch.zeros(shape) for k, shape in shapes.items()}
    run = {
        "hpcpipe": lambda: hpcpipe_load(shapes, work / "h5", into=existing),
        "hpcpipe-new": lambda: hpcpipe_load(shapes, work / "h5"),
        "torch": lambda: torch_load(work / "state.pt"),
        "torch-copy": lambda: copy_into(existing, torch.load(work / "state.pt")),
    }[kind]
    print(timed(run))


def copy_into(existing: dict, loaded: dict) -> None:
    """What model.load_state_dict / optimizer.load_state_dict do after torch.load."""
    with torch.no_grad():
        for k, v in loaded.items():
            existing[k].copy_(v)


def fresh_load(kind: str, work: Path, total_mb: int) -> float:
    """Seconds one load took in a new process (start-up and imports not counted)."""
    cmd = [
        sys.executable,
        __file__,
        "--load-worker",
        kind,
        "--dir",
        str(work),
        "--mb",
        str(total_mb),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(out.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--dir", default="/tmp/hpcpipe-ckbench")
    parser.add_argument("--load-worker", choices=LOADS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load_worker:
        return load_worker(args.load_worker, Path(args.dir), args.mb)
    torch.set_num_threads(1)
    work = Path(args.dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    state = make_state(args.mb)
    nbytes = sum(v.numel() * v.element_size() for v in state.values())
    ops = {
        "hpcpipe save": lambda r: timed_save(lambda: hpcpipe_save(state, work / "h5", r)),
        "torch save": lambda r: timed(lambda: torch_save(state, work / "state.pt")),
        **{f"{kind} load": lambda r, k=kind: fresh_load(k, work, args.mb) for kind in LOADS},
    }
    times = {k: [] for k in ops}
    groups = [["hpcpipe save", "torch save"], [f"{kind} load" for kind in LOADS]]
    for r in range(args.rounds + 1):
        for group in groups:
            for name in group[r % len(group) :] + group[: r % len(group)]:  # rotated order
                elapsed = ops[name](r + 1)
                if r:  # round 0 warms the page cache and the file system
                    times[name].append(elapsed)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{nbytes / 1e6:.0f} MB (parameters + AdamW moments), {args.rounds} rounds, medians")
    for ours, theirs, what in (
        ("hpcpipe save", "torch save", "save"),
        ("hpcpipe load", "torch load", "load (hpcpipe in place, as a resume; torch.load)"),
        ("hpcpipe load", "torch-copy load", "resume (+ torch's copy into the model)"),
        ("hpcpipe-new load", "torch load", "load into new tensors, both"),
    ):
        a, b = med[ours], med[theirs]
        rate = f"{nbytes / a / 1e9:.2f} GB/s vs {nbytes / b / 1e9:.2f} GB/s"
        print(f"  {what}: hpcpipe {a:.3f} s, torch {b:.3f} s ({rate}): {b / a:.2f}x")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
