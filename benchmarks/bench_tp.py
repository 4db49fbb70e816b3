"""Tensor parallelism on the benchmark GPT: tp = 2 (2 ranks) vs tp = 1 (1 rank), tokens/s.

    python benchmarks/bench_tp.py --rounds 3

The benchmark GPT of bench_pipeline.py (8 blocks, d_model 256, 4 heads, seq 128, vocab 256,
global batch 32, M = 8), 1 thread per rank, pp = dp = 1. Launches alternate (tp2, tp1, tp1,
tp2, ...); each times `--steps` steps after one warm-up step; medians. On CPUs, tp = 2 splits
every matmul in half and adds two Allreduces of the activations per block per direction.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = {"n_layers": 8, "d_model": 256, "n_heads": 4, "seq_len": 128, "vocab_size": 256}


def worker(tp: int, steps: int) -> None:
    import torch
    from mpi4py import MPI

    from hpcpipe import data
    from hpcpipe.config import build_config
    from hpcpipe.parallel.grid import Grid, Topology
    from hpcpipe.train.trainer import PipelineTrainer, make_blueprint

    torch.set_num_threads(1)
    config = build_config({
        "model": MODEL, "train": {"global_batch": 32, "steps": steps + 1},
        "parallel": {"tp": tp}, "schedule": {"name": "1f1b", "microbatches": 8},
    })  # fmt: skip
    comm = MPI.COMM_WORLD
    trainer = PipelineTrainer(config, Grid(comm, Topology(1, 1, tp)), make_blueprint(config, tp),
                              tokens=data.load_tokens(None))  # fmt: skip
    trainer.train_step()  # warm-up
    comm.Barrier()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    elapsed = time.perf_counter() - start
    if comm.Get_rank() == 0:
        print(json.dumps({"tokens_per_s": steps * 32 * 128 / elapsed}))


def launch(tp: int, steps: int) -> float:
    from hpcpipe.launch import mpi_env, mpiexec_command

    cmd = mpiexec_command(tp) + [sys.executable, __file__, "--worker", str(tp), "--steps",
                                 str(steps)]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, env=mpi_env(), capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--worker", type=int)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps)
        return
    runs = {1: [], 2: []}
    for r in range(args.rounds):
        for tp in (2, 1) if r % 2 == 0 else (1, 2):
            runs[tp].append(launch(tp, args.steps))
            print(f"round {r + 1}: tp={tp} {runs[tp][-1]:,.0f} tok/s", flush=True)
    med = {tp: statistics.median(v) for tp, v in runs.items()}
    print(f"tp=1 (1 rank): {med[1]:,.0f} tok/s   tp=2 (2 ranks): {med[2]:,.0f} tok/s   "
          f"speed-up {med[2] / med[1]:.2f}x (ideal 2.00x)")  # fmt: skip


if __name__ == "__main__":
    main()
