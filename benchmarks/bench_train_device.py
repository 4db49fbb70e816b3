"""Tokens/s and peak device memory of the benchmark Llama on a GPU, one rank per stage.

    mpiexec -n 2 python benchmarks/bench_train_device.py --device cuda --json train.json

The benchmark Llama of bench_pipeline.py (`--model llama`: 8 blocks, d_model 256, GQA 4/2
heads, seq 128, global batch 32, M = 8) in train.dtype (default bfloat16) at pp = K ranks
sharing the node's GPUs, for each --schedules entry. Every step is timed on the host clock
between `torch.cuda.synchronize()` calls on every rank and a barrier (kernels are asynchronous:
a bare perf_counter would time their launches), after --warmup untimed steps;
tokens/s = tokens per step / median over steps of the slowest rank's step time. Peak memory is
`torch.cuda.max_memory_allocated` per rank over the timed steps (reset after the warm-up)
and over the whole run. The trainer's own record (tokens_per_s, step_time, bubble and a
"memory" entry where the trainer reports one) is kept beside it.
`--device cpu` runs the same on the CPU (the dry run of benchmarks/gpu_check.sh; with
--tiny a two-layer model so that bf16 on a CPU stays quick).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run without installing
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from mpi4py import MPI  # noqa: E402

from hpcpipe import data  # noqa: E402
from hpcpipe.config import build_config  # noqa: E402
from hpcpipe.parallel.grid import Grid, Topology  # noqa: E402
from hpcpipe.train.trainer import PipelineTrainer, make_blueprint, pick_device  # noqa: E402

TINY = {"n_layers": 2, "d_model": 32, "n_heads": 4, "n_kv_heads": 2, "seq_len": 16}


def model_table(tiny: bool) -> dict:
    """bench_pipeline.py's Llama (the same dict, by import), or a tiny one for dry runs."""
    os.environ.setdefault("HPCPIPE_BENCH_MODEL", "llama")
    import bench_pipeline

    model = dict(bench_pipeline.MODELS["llama"])
    return {**model, **TINY} if tiny else model


def config_for(args, schedule: str, ranks: int):
    import bench_pipeline

    virtual = bench_pipeline.VIRTUAL if schedule.startswith("interleaved") else 1
    train = {**bench_pipeline.TRAIN, "dtype": args.dtype, "device": args.device}
    if args.tiny:
        train["global_batch"] = 8
    return build_config(
        {
            "model": model_table(args.tiny),
            "train": train,
            "parallel": {"pp": ranks, "timeout": 60},
            "schedule": {"name": schedule, "microbatches": args.microbatches, "virtual": virtual},
        }
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def run_schedule(comm, args, schedule: str, tokens) -> dict:
    """Warm-up, then timed steps of one schedule; rank 0 gets the record."""
    k = comm.Get_size()
    config = config_for(args, schedule, k)
    grid = Grid(comm, Topology(dp=1, pp=k, tp=1))
    device = torch.device(pick_device(config, comm))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats(device)
    trainer = PipelineTrainer(config, grid, make_blueprint(config, k), device=str(device),
                              tokens=tokens)  # fmt: skip
    for _ in range(args.warmup):
        trainer.train_step()
    sync(device)
    warm_peak = peak(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, records = [], []
    for _ in range(args.steps):
        sync(device)
        comm.Barrier()
        start = time.perf_counter()
        records.append(trainer.train_step())
        sync(device)
        times.append(comm.allreduce(time.perf_counter() - start, op=MPI.MAX))
    mine = {"device": str(device), "peak_timed": peak(device), "peak_warmup": warm_peak}
    if device.type == "cuda":
        mine["reserved"] = torch.cuda.max_memory_reserved(device)
    ranks = comm.gather(mine, root=0)
    grid.free()
    del trainer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    tokens_per_step = config.train.global_batch * config.model.seq_len
    med = statistics.median(times)
    own = [r.get("tokens_per_s") for r in records if r.get("tokens_per_s")]
    return {
        "schedule": schedule,
        "dtype": args.dtype,
        "pp": k,
        "microbatches": args.microbatches,
        "tokens_per_step": tokens_per_step,
        "tokens_per_s": tokens_per_step / med,
        "step_time_median": med,
        "step_times": times,
        "trainer_tokens_per_s_median": statistics.median(own) if own else None,
        "trainer_step_time": [r.get("step_time") for r in records],
        "bubble": [r.get("bubble") for r in records],
        "loss": [r.get("loss") for r in records],
        "memory": [r["memory"] for r in records if "memory" in r][-1:],  # if the trainer has it
        "ranks": ranks,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--schedules", nargs="+", default=["1f1b", "zb-h1"])
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per schedule")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="a two-layer model (dry runs)")
    parser.add_argument("--json", help="write the results here (rank 0)")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    torch.set_num_threads(1)
    tokens = data.load_tokens(None)
    out = {"model": model_table(args.tiny), "runs": []}
    for schedule in args.schedules:
        record = run_schedule(comm, args, schedule, tokens)
        if comm.Get_rank() == 0:
            out["runs"].append(record)
            peaks = [r["peak_timed"] for r in record["ranks"]]
            mib = ", ".join(f"{p / 2**20:.0f}" if p is not None else "-" for p in peaks)
            step_ms = record["step_time_median"] * 1e3
            print(f"  {schedule:<16} {args.dtype} pp={record['pp']}: "
                  f"{record['tokens_per_s']:12,.0f} tok/s  step {step_ms:8.2f} ms"
                  f"  peak MiB per rank [{mib}]", flush=True)  # fmt: skip
            if args.json:
                Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
