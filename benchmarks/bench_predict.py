"""Predict step times from a measured trace at one M, then measure them at another M.

    python benchmarks/bench_predict.py [--ranks 2] [--fit-m 4] [--m 8]

1. Train the benchmark GPT (bench_pipeline.py's) with ZB-H1 at M = --fit-m, tracing the last
   step (the split schedule measures T_B and T_W separately).
2. `hpcpipe schedule --fit TRACE` fits T_F, T_B, T_W, T_comm; the per-step overhead outside the
   pipeline (optimizer, reductions) is the traced step time minus the traced pipeline span.
3. For each schedule at M = --m: predict (simulated span + overhead), then train and trace it.
Prints predicted vs measured step time and the error (target: within 15%). The global batch
stays 32 sequences, so micro-batches are smaller at larger M: T_F/T_B scale by fit_m / m.
Every run is repeated --repeats times (fits and measurements are medians): one traced step on
this VM varies by 10-20 % from run to run.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hpcpipe.launch import mpi_env, mpiexec_command  # noqa: E402
from hpcpipe.pipeline.schedule import SPLIT_BACKWARD  # noqa: E402
from hpcpipe.pipeline.simulate import Costs, fit_costs, predict  # noqa: E402
from hpcpipe.pipeline.trace import compute_timeline, read_trace  # noqa: E402

MODEL = ["--model.n_layers=8", "--model.d_model=256", "--model.n_heads=4", "--model.seq_len=128",
         "--train.global_batch=32", "--steps", "3"]  # fmt: skip
SCHEDULES = [("1f1b", 1), ("gpipe", 1), ("zb-h1", 1), ("interleaved", 2), ("interleaved-zb", 2)]


def traced_run(ranks: int, name: str, M: int, V: int, path: Path) -> dict:
    """Train 3 steps; the last is traced; return (meta, events)."""
    cmd = mpiexec_command(ranks) + [
        sys.executable, "-m", "hpcpipe", "train", *MODEL, "--pp", str(ranks), "--schedule", name,
        "--microbatches", str(M), f"--schedule.virtual={V}", "--trace", str(path)]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, env=mpi_env(), check=True, capture_output=True, text=True)
    return read_trace(path)


def span(events) -> float:
    timeline = compute_timeline(events)
    return max(t.end for t in timeline) - min(t.start for t in timeline)


def median_fit(args, tmp: Path) -> tuple[Costs, float]:
    """Costs and per-step overhead fitted on each of --repeats traced ZB-H1 runs, medians."""
    fits, overheads = [], []
    for _ in range(args.repeats):
        meta, events = traced_run(args.ranks, "zb-h1", args.fit_m, 1, tmp / "fit.json")
        fits.append(fit_costs(compute_timeline(events), V=1))
        overheads.append(meta["step_time"] - span(events))
    fields = ("t_f", "t_b", "t_w", "t_comm")
    median = {k: statistics.median(getattr(c, k) for c in fits) for k in fields}
    return Costs(median["t_f"], median["t_b"], median["t_w"], median["t_comm"]), statistics.median(
        overheads
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--fit-m", type=int, default=4)
    parser.add_argument("--m", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="runs per fit and measurement")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fitted, overhead = median_fit(args, Path(tmp))
        scale = args.fit_m / args.m  # same global batch: smaller micro-batches
        print(f"fitted at M={args.fit_m}: T_F={fitted.t_f * 1e3:.1f} ms T_B="
              f"{fitted.t_b * 1e3:.1f} ms T_W={fitted.t_w * 1e3:.1f} ms T_comm="
              f"{fitted.t_comm * 1e3:.2f} ms per micro-batch; overhead {overhead * 1e3:.0f} ms "
              "per step")  # fmt: skip
        print(f"{'schedule':<14} {'predicted':>10} {'measured':>10} {'error':>7}")
        for name, V in SCHEDULES:
            f, b, w = fitted.t_f * scale, fitted.t_b * scale, fitted.t_w * scale
            # Schedules without the split run the weight gradient inside B.
            costs = Costs(f, b, w, fitted.t_comm) if name in SPLIT_BACKWARD else Costs(
                f, b + w, 0.0, fitted.t_comm)  # fmt: skip
            sim = predict(name, args.ranks, args.m, V, costs)
            predicted = sim.step_time + overhead
            measured = statistics.median(
                traced_run(args.ranks, name, args.m, V, Path(tmp) / f"{name}.json")[0]["step_time"]
                for _ in range(args.repeats)
            )
            error = (predicted - measured) / measured
            print(f"{name:<14} {predicted * 1e3:8.0f} ms {measured * 1e3:8.0f} ms {error:+7.1%}",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
