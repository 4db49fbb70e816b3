"""Ping-pong of device tensors: hpcpipe's P2P (isend / irecv + wait) vs raw mpi4py Send/Recv.

    mpiexec -n 2 python benchmarks/bench_p2p_device.py --device cuda --json p2p.json

Both ranks may share one GPU. The path is the one hpcpipe takes: when
`hpcpipe.parallel.p2p.cuda_aware_mpi()` says the MPI library takes device pointers, raw
mpi4py sends and receives the cuda buffers themselves; otherwise both sides stage through
pinned host memory (raw: a copy into a pinned buffer, Send; Recv into a pinned buffer, a copy
onto the device), as hpcpipe's P2P does. Every measurement is timed on the host clock between
two `torch.cuda.synchronize()` calls (and with CUDA events on the current stream, reported
beside it), so queued copies are inside the time. GB/s = bytes one way / (round trip / 2).

Correctness: each rank sends its own pattern (seeded by rank and size); after every
measurement the last buffer received must equal the peer's pattern exactly, for both contenders.
`--device cpu` runs the same on CPU tensors (the dry run of benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from mpi4py import MPI

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run without installing

from hpcpipe.parallel.p2p import P2P, cuda_aware_mpi  # noqa: E402

PING, PONG = 21, 22
CONTENDERS = ("hpcpipe", "raw")
GPU_SIZES = ("64KiB", "1MiB", "16MiB", "64MiB")
UNITS = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def parse_size(text: str) -> int:
    for unit, scale in UNITS.items():
        if text.endswith(unit):
            return int(text[: -len(unit)]) * scale
    return int(text)


def pattern(rank: int, nbytes: int, device) -> torch.Tensor:
    """float32 values that differ per rank and per size (never zeros)."""
    g = torch.Generator().manual_seed(1000 * rank + nbytes % 997)
    return torch.rand(nbytes // 4, generator=g).add_(rank + 1).to(device)


class Sync:
    """Host-clock and CUDA-event timing of a region, both ending on a synchronize."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time(self, comm, run) -> tuple[float, float | None]:
        self.sync()
        comm.Barrier()
        if self.cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
        start = time.perf_counter()
        run()
        if self.cuda:
            end.record()
        self.sync()
        wall = time.perf_counter() - start
        return wall, (begin.elapsed_time(end) / 1e3 if self.cuda else None)


def pingpong_hpcpipe(p2p: P2P, send: torch.Tensor, reps: int) -> torch.Tensor:
    """The runtime's calls, as bench_p2p.py: irecv posted early, wait, isend, release, flush.
    Returns a copy of the last tensor received (on the device)."""
    peer = 1 - p2p.rank
    first = p2p.rank == 0
    tag_in, tag_out = (PONG, PING) if first else (PING, PONG)
    what = "pong" if first else "ping"
    shape, dtype, device = send.shape, send.dtype, send.device
    incoming = p2p.irecv(shape, dtype, device, peer, tag_in, what)
    if first:
        p2p.isend(send, peer, tag_out)
    last = None
    for i in range(reps):
        got = p2p.wait(incoming)
        if i + 1 == reps:
            last = got.clone()
        if not first or i + 1 < reps:
            p2p.isend(send, peer, tag_out)
        p2p.release(incoming)
        if i + 1 < reps:
            incoming = p2p.irecv(shape, dtype, device, peer, tag_in, what)
    p2p.flush()
    return last


class Raw:
    """Blocking mpi4py Send/Recv of the same bytes: device buffers when MPI is CUDA-aware,
    else staged through pinned host buffers (the copies hpcpipe makes, nothing more)."""

    def __init__(self, comm, send: torch.Tensor, cuda_aware: bool):
        self.comm, self.send = comm, send
        self.recv = torch.empty_like(send)
        cuda = send.device.type == "cuda"
        self.staged = cuda and not cuda_aware
        self.cuda = cuda
        if self.staged:
            self.host_send = torch.empty(send.shape, dtype=send.dtype, pin_memory=True)
            self.host_recv = torch.empty(send.shape, dtype=send.dtype, pin_memory=True)
            self.out, self.into = self.host_send.numpy(), self.host_recv.numpy()
        elif cuda:
            self.out, self.into = [send, MPI.FLOAT], [self.recv, MPI.FLOAT]
        else:
            self.out, self.into = send.numpy(), self.recv.numpy()

    def _send(self, peer: int, tag: int) -> None:
        if self.staged:
            self.host_send.copy_(self.send)  # device -> pinned host, synchronous
        elif self.cuda:
            torch.cuda.current_stream(self.send.device).synchronize()
        self.comm.Send(self.out, dest=peer, tag=tag)

    def _recv(self, peer: int, tag: int) -> None:
        self.comm.Recv(self.into, source=peer, tag=tag)
        if self.staged:
            self.recv.copy_(self.host_recv)  # pinned host -> device

    def pingpong(self, reps: int) -> torch.Tensor:
        rank = self.comm.Get_rank()
        peer = 1 - rank
        for _ in range(reps):
            if rank == 0:
                self._send(peer, PING)
                self._recv(peer, PONG)
            else:
                self._recv(peer, PING)
                self._send(peer, PONG)
        return self.recv.clone()


def copy_bandwidth(nbytes: int, device: torch.device, reps: int) -> dict:
    """Pinned host <-> device copy GB/s (one rank): the floor under the staged path."""
    if device.type != "cuda":
        return {}
    dev = torch.empty(nbytes // 4, device=device)
    host = torch.empty(nbytes // 4, pin_memory=True)
    out = {}
    for name, dst, src in (("d2h", host, dev), ("h2d", dev, host)):
        dst.copy_(src)
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(reps):
            dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(device)
        out[name] = nbytes * reps / (time.perf_counter() - start) / 1e9
    return out


def repeats(nbytes: int, budget_bytes: int) -> int:
    """Round trips per measurement: `budget_bytes` each way, between 5 and 2,000."""
    return max(5, min(2000, budget_bytes // nbytes))


def bench(comm, device: torch.device, sizes: list[int], rounds: int, budget: int) -> dict:
    rank = comm.Get_rank()
    aware = cuda_aware_mpi()
    p2p = P2P(comm, timeout=60.0)
    timer = Sync(device)
    results = {}
    for nbytes in sizes:
        send = pattern(rank, nbytes, device)
        expected = pattern(1 - rank, nbytes, "cpu")
        raw = Raw(comm, send, aware)
        runs = {
            "hpcpipe": lambda reps, send=send: pingpong_hpcpipe(p2p, send, reps),
            "raw": raw.pingpong,
        }
        reps = repeats(nbytes, budget)
        for c in CONTENDERS:  # warm-up: connections, pinned pool buffers, allocator
            runs[c](2)
        rows = {c: {"gbps": [], "gbps_events": [], "correct": True} for c in CONTENDERS}
        for r in range(rounds):
            order = CONTENDERS if r % 2 == 0 else CONTENDERS[::-1]
            for c in order:
                box = {}

                def run(run_c=runs[c], box=box, reps=reps):
                    box["t"] = run_c(reps)

                wall, events = timer.time(comm, run)
                equal = bool(torch.equal(box["t"].cpu(), expected))
                rows[c]["correct"] &= comm.allreduce(equal, op=MPI.LAND)
                wall = comm.allreduce(wall, op=MPI.MAX)
                rows[c]["gbps"].append(nbytes * reps / (wall / 2) / 1e9)
                if events is not None:
                    events = comm.allreduce(events, op=MPI.MAX)
                    rows[c]["gbps_events"].append(nbytes * reps / (events / 2) / 1e9)
        for c in CONTENDERS:
            rows[c]["median_gbps"] = statistics.median(rows[c]["gbps"])
        results[str(nbytes)] = {
            "bytes": nbytes,
            "round_trips": reps,
            **rows,
            "ratio": rows["hpcpipe"]["median_gbps"] / rows["raw"]["median_gbps"],
            "copy_gbps": copy_bandwidth(nbytes, device, max(3, reps // 4)) if rank == 0 else {},
        }
        del raw
    return {"cuda_aware": aware, "path": path_name(device, aware), "sizes": results}


def path_name(device: torch.device, aware: bool) -> str:
    if device.type != "cuda":
        return "host (CPU tensors)"
    return "CUDA-aware (device pointers)" if aware else "staged through pinned host memory"


def table(out: dict) -> str:
    rows = [
        f"device ping-pong, 2 ranks on {out['device']}, path: {out['path']}; "
        f"median GB/s over {out['rounds']} rounds (wall time between synchronizes)",
        f"{'size':>10} {'hpcpipe':>9} {'raw':>9} {'ratio':>6}  correct   d2h/h2d GB/s",
    ]
    for rec in out["sizes"].values():
        n = rec["bytes"]
        label = f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"
        ok = "yes" if rec["hpcpipe"]["correct"] and rec["raw"]["correct"] else "NO"
        copy = rec["copy_gbps"]
        copies = f"{copy['d2h']:.1f}/{copy['h2d']:.1f}" if copy else "-"
        rows.append(
            f"{label:>10} {rec['hpcpipe']['median_gbps']:9.2f} {rec['raw']['median_gbps']:9.2f} "
            f"{rec['ratio']:6.3f}  {ok:>7}   {copies}"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--sizes", nargs="+", default=list(GPU_SIZES), help="e.g. 64KiB 1MiB")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--budget", default="256MiB", help="bytes each way per measurement")
    parser.add_argument("--json", help="write the results here (rank 0)")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    if comm.Get_size() != 2:
        raise SystemExit("run with exactly 2 ranks")
    torch.set_num_threads(1)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda but torch sees no CUDA device")
        node = comm.Split_type(MPI.COMM_TYPE_SHARED)
        device = torch.device(f"cuda:{node.Get_rank() % torch.cuda.device_count()}")
        node.Free()
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    sizes = [parse_size(s) for s in args.sizes]
    out = bench(comm, device, sizes, args.rounds, parse_size(args.budget))
    gathered = comm.gather(str(device), root=0)
    if comm.Get_rank() == 0:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        out.update(device=f"{name} ({', '.join(gathered)})", rounds=args.rounds)
        out["pass"] = all(r[c]["correct"] for r in out["sizes"].values() for c in CONTENDERS)
        print(table(out), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
