"""bf16 mixed precision against float32 and the old pure-bf16 storage, over a long run.

Usage: python benchmarks/bench_precision.py [--steps 300] [--out DIR]

float32 and bfloat16 (fp32 masters, fp32 gradient accumulation) run through `hpcpipe train`
on 2 ranks (pp=2, the benchmark GPT of jobs/configs/benchmark.toml, its learning rate, the
built-in text); the old pure-bf16 training (tests/precision_helpers.py) runs in one process
on the same model, data and seed. Prints the final losses (last step, and the mean of the last
20 steps) and each one's gap to float32, and the tokens/s of float32 vs bf16.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

CONFIG = ROOT / "jobs" / "configs" / "benchmark.toml"


# Every window is trained on (no validation hold-out), in the CLI runs and the in-process one.
LR: list[str] = ["--data.val_fraction=0"]  # + --train.lr / min_lr when --lr is given


def run_cli(dtype: str, steps: int, out: Path, seed: int) -> list[dict]:
    from hpcpipe.launch import mpi_env, mpiexec_command

    metrics = out / f"{dtype}-seed{seed}.jsonl"
    cmd = mpiexec_command(2) + [sys.executable, "-m", "hpcpipe", "train", "--config",
                                str(CONFIG), f"--train.steps={steps}", f"--train.dtype={dtype}",
                                f"--train.seed={seed}", "--train.log_every=50",
                                "--metrics", str(metrics), *LR]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, env=mpi_env(), check=True)
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def run_pure_bf16(steps: int, seed: int) -> list[float]:
    import torch
    from precision_helpers import PureHalfTrainer

    from hpcpipe.config import load_config

    torch.set_num_threads(2)
    overrides = {"train.steps": str(steps), "train.seed": str(seed)}
    overrides.update(arg.removeprefix("--").split("=", 1) for arg in LR)
    config = load_config(CONFIG, overrides)
    trainer = PureHalfTrainer(config)
    losses = []
    for _ in range(steps):
        losses.append(trainer.forward_backward())
        trainer.finish_step()
    return losses


def tail_mean(values: list[float], n: int = 20) -> float:
    return sum(values[-n:]) / len(values[-n:])


def speed_rounds(rounds: int, out: Path) -> None:
    """tokens/s of float32 and bfloat16 in alternating short runs (median after 2 steps)."""
    ratios = []
    for index in range(rounds):
        speed = {}
        for dtype in ("float32", "bfloat16"):
            records = run_cli(dtype, 12, out, 1234)
            speed[dtype] = statistics.median(r["tokens_per_s"] for r in records[2:])
        ratios.append(speed["bfloat16"] / speed["float32"])
        print(f"round {index + 1}: float32 {speed['float32']:,.0f} tok/s, bfloat16 "
              f"{speed['bfloat16']:,.0f} tok/s, ratio {ratios[-1]:.3f}", flush=True)  # fmt: skip
    print(f"median per-round ratio bfloat16 / float32: {statistics.median(ratios):.3f}")


def report(curves: dict[str, list[float]]) -> dict[str, float]:
    """Print one seed's table; return each run's gap to float32 (mean of the last 20 steps)."""
    ref_last, ref_tail = curves["float32"][-1], tail_mean(curves["float32"])
    print(f"{'run':<14} {'last loss':>10} {'gap':>8} {'mean last 20':>13} {'gap':>8}")
    gaps = {}
    for name, losses in curves.items():
        last, tail = losses[-1], tail_mean(losses)
        gaps[name] = tail / ref_tail - 1
        print(f"{name:<14} {last:>10.4f} {100 * (last / ref_last - 1):>7.2f}% "
              f"{tail:>13.4f} {100 * gaps[name]:>7.2f}%")  # fmt: skip
    return gaps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", default="1234", help="comma-separated train.seed values")
    parser.add_argument("--lr", type=float, help="peak learning rate (min_lr = lr / 10)")
    parser.add_argument("--no-pure", action="store_true", help="skip the pure-bf16 reference")
    parser.add_argument("--out", default="/tmp/bench_precision")
    parser.add_argument(
        "--speed-rounds", type=int, default=0, help="instead: N rounds of 12-step fp32, bf16 runs"
    )
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.lr:
        LR.extend([f"--train.lr={args.lr}", f"--train.min_lr={args.lr / 10}"])
    if args.speed_rounds:
        return speed_rounds(args.speed_rounds, out)
    all_gaps, speeds = [], {"float32": [], "bfloat16": []}
    for seed in (int(s) for s in args.seeds.split(",")):
        runs = {dtype: run_cli(dtype, args.steps, out, seed) for dtype in speeds}
        curves = {dtype: [r["loss"] for r in records] for dtype, records in runs.items()}
        if not args.no_pure:
            curves["pure-bfloat16"] = run_pure_bf16(args.steps, seed)
        (out / f"curves-seed{seed}.json").write_text(json.dumps(curves))
        print(f"seed {seed}:")
        all_gaps.append(report(curves))
        for dtype, records in runs.items():
            speeds[dtype].append(statistics.median(r["tokens_per_s"] for r in records[5:]))
    for name in all_gaps[0]:
        mean = statistics.mean(g[name] for g in all_gaps)
        print(f"{name}: mean gap to float32 over {len(all_gaps)} seed(s) {100 * mean:+.2f}%")
    for dtype, values in speeds.items():
        print(f"{dtype}: median {statistics.median(values):,.0f} tokens/s (pp=2, 2 ranks)")


if __name__ == "__main__":
    main()
