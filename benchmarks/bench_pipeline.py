"""hpcpipe 1F1B vs torch.distributed.pipelining Schedule1F1B vs single-process training.

Launcher (runs everything, interleaved, and prints the table):
    python benchmarks/bench_pipeline.py --ranks 2 --rounds 5
Workers (started by the launcher; rank 0 prints one `BENCH_JSON {...}` line):
    mpiexec -n K python benchmarks/bench_pipeline.py --worker hpcpipe|torch --ranks K
    python benchmarks/bench_pipeline.py --worker serial

Every contender trains the same GPT (same layers, seed, data, AdamW, clipping, M micro-batches)
with one thread per process, and is timed over `--steps` optimizer steps after one warm-up step.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from anywhere without installing hpcpipe

MODEL = {"n_layers": 8, "d_model": 256, "n_heads": 4, "seq_len": 128, "vocab_size": 256}
TRAIN = {"global_batch": 32, "steps": 100, "dtype": "float32", "threads": 1, "warmup_steps": 2}
MICROBATCHES = 8
TAG = "BENCH_JSON "
CONTENDERS = ("hpcpipe", "torch", "serial")


def bench_config(ranks: int):
    """The benchmark model as an hpcpipe Config for `ranks` pipeline stages."""
    from hpcpipe.config import build_config

    return build_config(
        {
            "model": MODEL,
            "train": TRAIN,
            "parallel": {"pp": ranks},
            "schedule": {"name": "1f1b", "microbatches": MICROBATCHES},
        }
    )


def tokens_per_step() -> int:
    return TRAIN["global_batch"] * MODEL["seq_len"]


def time_steps(step, steps: int) -> list[float]:
    """One warm-up call (shape inference, allocator, caches), then `steps` timed calls."""
    step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def summary(times: list[float], **extra) -> dict:
    """tokens/s over all timed steps (each step ends synchronised across ranks)."""
    return {"tokens_per_s": tokens_per_step() * len(times) / sum(times), "step_times": times, **extra}


# --- workers -----------------------------------------------------------------------------------


def worker_serial(args) -> dict:
    """Whole model in one process, M micro-batches accumulated per step."""
    import torch

    from hpcpipe import data
    from hpcpipe.serial import SerialTrainer

    torch.set_num_threads(1)
    trainer = SerialTrainer(bench_config(1), tokens=data.load_tokens(None))

    def step():
        trainer.forward_backward()
        trainer.finish_step()

    return summary(time_steps(step, args.steps))


def worker_hpcpipe(args) -> dict | None:
    """hpcpipe's PipelineTrainer (1F1B) on every rank of COMM_WORLD."""
    import torch
    from mpi4py import MPI

    from hpcpipe import data
    from hpcpipe.grid import Grid, Topology
    from hpcpipe.train import PipelineTrainer, make_plan

    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    k = comm.Get_size()
    config = bench_config(k)
    grid = Grid(comm, Topology(dp=1, pp=k, tp=1))
    trainer = PipelineTrainer(config, grid, make_plan(config, k), tokens=data.load_tokens(None))
    records = []
    # train_step ends in an Allreduce, so every rank leaves each step together.
    times = time_steps(lambda: records.append(trainer.train_step()), args.steps)
    measured = records[1:]
    result = summary(
        times,
        bubble=statistics.mean(r["bubble"] for r in measured),
        own_tokens_per_s=statistics.median(r["tokens_per_s"] for r in measured),
    )
    return result if comm.Get_rank() == 0 else None


def mpi_rank_size() -> tuple[int, int]:
    """Rank and size from the launcher's environment (Open MPI, MPICH/Hydra, Slurm)."""
    for rank_key, size_key in (
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
        ("PMI_RANK", "PMI_SIZE"),
        ("SLURM_PROCID", "SLURM_NTASKS"),
    ):
        if rank_key in os.environ:
            return int(os.environ[rank_key]), int(os.environ[size_key])
    return 0, 1


def worker_torch(args) -> dict | None:
    """torch.distributed.pipelining Schedule1F1B over gloo, on hpcpipe's own Stage modules."""
    import torch
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    from hpcpipe import data, optim
    from hpcpipe.model import Stage, loss_fn
    from hpcpipe.train import make_plan

    torch.set_num_threads(1)
    rank, k = mpi_rank_size()
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=rank, world_size=k
    )
    config = bench_config(k)
    plan = make_plan(config, k)  # the same balanced split hpcpipe uses
    module = Stage(plan.model, plan.partition.layers(rank), config.train.seed)
    # scale_grads=True divides by M: the same loss/M accumulation as hpcpipe and SerialTrainer.
    schedule = Schedule1F1B(
        PipelineStage(module, rank, k, torch.device("cpu")), MICROBATCHES, loss_fn=loss_fn
    )
    params = list(module.parameters())
    optimizer = optim.make_adamw(module.named_parameters(), config.train)
    batches = batch_source(config, data) if rank in (0, k - 1) else None
    state = {"step": 0}

    def step():
        for p in params:
            p.grad = None
        run_schedule(schedule, rank, k, next(batches) if batches else None)
        clip_and_step(params, optimizer, config.train, state["step"])
        state["step"] += 1

    result = summary(time_steps(step, args.steps))
    dist.destroy_process_group()
    return result if rank == 0 else None


def batch_source(config, data):
    """Global batches from the same sampler (seed) hpcpipe uses."""
    tokens = data.load_tokens(None)
    t = config.train
    sampler = data.Sampler(len(tokens), config.model.seq_len, t.global_batch, t.seed)
    while True:
        yield data.make_batch(tokens, sampler.next_starts(), config.model.seq_len)


def run_schedule(schedule, rank: int, k: int, batch) -> None:
    """First stage feeds tokens, last stage the targets; the schedule splits into M chunks."""
    if rank == 0:
        schedule.step(batch[0])
    elif rank == k - 1:
        schedule.step(target=batch[1], losses=[])
    else:
        schedule.step()


def clip_and_step(params, optimizer, train, step_index: int) -> None:
    """Global-norm clipping across stages and AdamW: the work hpcpipe's finish_step does."""
    import torch
    import torch.distributed as dist

    from hpcpipe import optim

    # NOTE: this all_reduce also ends each step with every rank in sync, like hpcpipe's.
    total = torch.tensor([optim.grad_square_sum(params)], dtype=torch.float64)
    dist.all_reduce(total)
    optim.scale_grads(params, optim.clip_coefficient(float(total) ** 0.5, train.grad_clip))
    optim.set_lr(optimizer, optim.lr_at(step_index, train))
    optimizer.step()


WORKERS = {"serial": worker_serial, "hpcpipe": worker_hpcpipe, "torch": worker_torch}


# --- launcher ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(kind: str, ranks: int, steps: int) -> list[str]:
    """The command line of one contender's run."""
    from hpcpipe.launch import mpiexec_command

    script = [sys.executable, str(Path(__file__).resolve()), "--worker", kind]
    script += ["--steps", str(steps), "--ranks", str(ranks), "--port", str(free_port())]
    return script if kind == "serial" else mpiexec_command(ranks) + script


def run_one(kind: str, ranks: int, steps: int, timeout: float) -> dict:
    """Launch one contender and return rank 0's JSON record."""
    from hpcpipe.launch import mpi_env

    proc = subprocess.run(
        command(kind, ranks, steps),
        env=mpi_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(TAG)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{kind} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(TAG) :])


def run_rounds(args) -> dict[str, list[dict]]:
    """Rounds of all contenders, the order rotated each round so none always runs first."""
    runs: dict[str, list[dict]] = {kind: [] for kind in CONTENDERS}
    for r in range(args.rounds):
        order = CONTENDERS[r % 3 :] + CONTENDERS[: r % 3]
        for kind in order:
            record = run_one(kind, args.ranks, args.steps, args.timeout)
            runs[kind].append(record)
            print(f"round {r + 1}/{args.rounds} {kind:>7}: {record['tokens_per_s']:7,.0f} tok/s")
            sys.stdout.flush()
    return runs


def report(runs: dict[str, list[dict]], k: int) -> str:
    """The results table: medians over rounds."""
    med = {kind: statistics.median(r["tokens_per_s"] for r in rs) for kind, rs in runs.items()}
    ideal = k * med["serial"]
    cores = os.cpu_count() or 1
    bubble = statistics.median(r["bubble"] for r in runs["hpcpipe"])
    rows = [
        f"K={k} ranks on {cores} cores{' (OVERSUBSCRIBED)' if k > cores else ''}, "
        f"M={MICROBATCHES}, {len(runs['serial'])} rounds; median tokens/s "
        f"(min-max over rounds):",
    ]
    for kind in CONTENDERS:
        values = [r["tokens_per_s"] for r in runs[kind]]
        rows.append(f"  {kind:<24} {med[kind]:8,.0f}   ({min(values):,.0f}-{max(values):,.0f})")
    ratios = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(*(runs[c] for c in CONTENDERS[:2]), strict=True)]
    rows += [
        f"  hpcpipe / torch          {med['hpcpipe'] / med['torch']:8.3f}   "
        f"(per-round ratios median {statistics.median(ratios):.3f})",
        f"  efficiency hpcpipe       {med['hpcpipe'] / ideal:8.3f}   = tok/s / ({k} x serial)",
        f"  efficiency torch         {med['torch'] / ideal:8.3f}",
        f"  hpcpipe measured bubble  {bubble:8.3f}   (1F1B ideal (K-1)/(M+K-1) = "
        f"{(k - 1) / (MICROBATCHES + k - 1):.3f})",
    ]
    if k > cores:
        per_core = min(k, cores) * med["serial"]
        rows.append(
            f"  per-core efficiency      hpcpipe {med['hpcpipe'] / per_core:.3f}, "
            f"torch {med['torch'] / per_core:.3f}   = tok/s / ({cores} cores x serial)"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per run")
    parser.add_argument("--worker", choices=sorted(WORKERS))
    parser.add_argument("--port", type=int, default=29500, help="gloo rendezvous (torch worker)")
    parser.add_argument("--json", help="also write every run's record here")
    args = parser.parse_args()
    if args.worker:
        result = WORKERS[args.worker](args)
        if result is not None:
            print(TAG + json.dumps(result), flush=True)
        return
    runs = run_rounds(args)
    print(report(runs, args.ranks))
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
