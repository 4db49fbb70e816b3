"""ZeRO-1 against the replicated optimizer at dp=2: tokens/s and optimizer bytes per rank.

Usage: python benchmarks/bench_zero.py [--rounds 3] [--steps 12] [--dtype float32]

Each round runs `hpcpipe train` on the benchmark GPT (jobs/configs/benchmark.toml) at
dp=2 pp=1 (the two ranks are data-parallel replicas) with parallel.zero=0, then =1, so both
see the same machine state; the per-round ratio uses the median tokens/s over the steps after
the first two. The optimizer bytes come from the metrics' measured "memory" (largest rank).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "jobs" / "configs" / "benchmark.toml"


def run(zero: int, steps: int, dtype: str, workdir: Path) -> tuple[float, dict]:
    from hpcpipe.launch import mpi_env, mpiexec_command

    metrics = workdir / f"zero{zero}.jsonl"
    cmd = mpiexec_command(2) + [sys.executable, "-m", "hpcpipe", "train", "--config",
                                str(CONFIG), "--dp", "2", "--pp", "1", f"--steps={steps}",
                                f"--train.dtype={dtype}", f"--parallel.zero={zero}",
                                "--train.log_every=1000", "--metrics", str(metrics)]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, env=mpi_env(), check=True, capture_output=True)
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    speed = statistics.median(r["tokens_per_s"] for r in records[2:])
    return speed, records[-1].get("memory", {})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    ratios, speeds, memory = [], {0: [], 1: []}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            got = {z: run(z, args.steps, args.dtype, Path(tmp)) for z in (0, 1)}
            for z, (speed, mem) in got.items():
                speeds[z].append(speed)
                memory[z] = mem
            ratios.append(got[1][0] / got[0][0])
            print(f"round {round_index + 1}: zero=0 {got[0][0]:,.0f} tok/s, zero=1 "
                  f"{got[1][0]:,.0f} tok/s, ratio {ratios[-1]:.3f}", flush=True)  # fmt: skip
    print(f"median per-round ratio zero=1 / zero=0: {statistics.median(ratios):.3f}")
    for z in (0, 1):
        mem = memory[z]
        opt = mem.get("optimizer")
        line = f"zero={z}: median {statistics.median(speeds[z]):,.0f} tok/s"
        if opt is not None:
            line += f", optimizer {opt / 2**20:.2f} MiB, total {mem['total'] / 2**20:.2f} MiB"
        print(line + " (largest rank)")


if __name__ == "__main__":
    main()
