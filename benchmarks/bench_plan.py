"""The planner against measured runs: predicted vs measured step time and memory, 4 ranks.

    python benchmarks/bench_plan.py [--ranks 4] [--rounds 3] [--steps 16] [--warmup 8] [--out DIR]
        [--head-to-head 4] [--head-to-head-of DIR/bench_plan.json]

1. Before every round, `mpiexec -n 4 hpcpipe plan --profile DIR/profile_rN.json` times this
   machine's layers of the benchmark GPT (F, B, W per micro-batch size and tp degree), its p2p
   and allreduce, and how fast 1..4 processes run at once on its cores. A shared VM's speed
   drifts by +-15 % over the half hour the runs take; one two-minute profile samples one spell.
2. Each layout trains --steps steps under mpiexec, in --rounds interleaved rounds (every
   layout once per round, so the VM's slow spells hit all of them): the first profile's top
   --first-choices layouts and a fixed mix of others (dp, pp, tp, schedules, M, recomputation,
   ZeRO). Measured step time = the median over rounds of each run's median step_time after
   --warmup steps; measured memory = the metrics' MAX-over-ranks total. The planner predicts
   the steady state, and on this VM some layouts take 8-10 steps to reach it (dp2 pp2 M1
   gpipe: 2.04 s at step 1, 1.38 s at step 8, 1.18-1.33 s from step 9 on), so the first 8
   steps are skipped.
3. `hpcpipe plan --device DIR/profile_r1.json,...` (the profiles merged by median) ranks every
   layout and predicts each measured one; its first choice is measured after the rounds if it
   was not among them.
4. Head to head (--head-to-head N, default 4): unless the first choice was the fastest
   measured, the two run side by side N more times in alternating order, and
   `head_to_head.first_vs_fastest` is the ratio of their medians. The mix's fastest is the
   least of some 17 noisy medians, biased low; paired runs in the same spells measure the gap.
   `--head-to-head-of DIR/bench_plan.json` runs only this step on a written report.
Prints the table (error per layout, Spearman rank correlation, the first choice against the
fastest measured) and writes DIR/bench_plan.json.
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
sys.path.insert(0, str(ROOT))

from hpcpipe import config as cfg  # noqa: E402
from hpcpipe.launch import mpi_env, mpiexec_command  # noqa: E402
from hpcpipe.models import get_spec  # noqa: E402
from hpcpipe.plan.machines import ProfileMachine  # noqa: E402
from hpcpipe.plan.merge import load_profiles  # noqa: E402
from hpcpipe.plan.profile import groups_of  # noqa: E402
from hpcpipe.plan.search import memory_of, search  # noqa: E402
from hpcpipe.plan.timemodel import Layout, PlanModel, predict  # noqa: E402

MODEL = {"model.n_layers": 8, "model.d_model": 256, "model.n_heads": 4, "model.seq_len": 128,
         "model.vocab_size": 256, "train.global_batch": 32, "train.dtype": "float32"}  # fmt: skip
# (dp, pp, tp, V, M, schedule, recompute, zero): every axis and schedule family at 4 ranks
MIX = [
    (4, 1, 1, 1, 1, "1f1b", "false", 0),
    (4, 1, 1, 1, 2, "1f1b", "false", 1),
    (2, 2, 1, 1, 8, "1f1b", "full", 0),
    (2, 2, 1, 1, 4, "zb-h1", "false", 1),
    (1, 4, 1, 1, 4, "1f1b", "false", 0),
    (1, 4, 1, 1, 16, "1f1b", "false", 0),
    (1, 4, 1, 1, 8, "gpipe", "selective", 0),
    (1, 4, 1, 2, 8, "interleaved", "false", 0),
    (1, 4, 1, 1, 8, "zb-h1", "false", 0),
    (2, 1, 2, 1, 2, "1f1b", "false", 0),
    (1, 2, 2, 1, 8, "1f1b", "false", 0),
    (1, 1, 4, 1, 1, "1f1b", "false", 0),
    # pipelines with few micro-batches: ranks idle, so the cores are shared by fewer processes
    (1, 4, 1, 1, 1, "gpipe", "false", 0),
    (1, 4, 1, 1, 2, "1f1b", "false", 0),
    (2, 2, 1, 1, 1, "1f1b", "false", 0),
]


def flags(values: dict) -> list[str]:
    return [f"--{k}={v}" for k, v in values.items()]


def run(cmd: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=ROOT, env=mpi_env(), capture_output=True, text=True,
                         timeout=timeout)  # fmt: skip
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return out


def profile(ranks: int, path: Path) -> None:
    run(mpiexec_command(ranks) + [sys.executable, "-m", "hpcpipe", "plan", "--profile", str(path),
        *flags(MODEL)])  # fmt: skip


def measure(ranks: int, layout: Layout, steps: int, tmp: Path, warmup: int) -> dict:
    metrics = tmp / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    run(mpiexec_command(ranks) + [sys.executable, "-m", "hpcpipe", "train", *flags(MODEL),
        *layout.flags(), "--steps", str(steps), "--metrics", str(metrics),
        "--train.eval_every=0", "--train.log_every=1000"])  # fmt: skip
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    records = [r for r in records if "step_time" in r]
    times = [r["step_time"] for r in records[warmup:]]
    return {"step_s": statistics.median(times), "memory": max(r["memory"]["total"]
            for r in records)}  # fmt: skip


def head_to_head(ranks, first: Layout, fastest: Layout, rounds, steps, warmup) -> dict:
    """The first choice and the fastest measured layout run side by side, `rounds` times,
    in alternating order: a comparison of two layouts in the same spells of the VM.

    The mix's fastest is the minimum of ~17 noisy medians, so it is biased low (the VM's
    speed drifts by +-5-10 % between runs of one layout); paired runs measure the gap itself.
    """
    times = {first: [], fastest: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for lay in (first, fastest) if r % 2 == 0 else (fastest, first):
                times[lay].append(measure(ranks, lay, steps, Path(tmp), warmup)["step_s"])
                print(f"head to head {r + 1} {lay}: {times[lay][-1]:.3f} s", flush=True)
    ratio = statistics.median(times[first]) / statistics.median(times[fastest]) - 1
    return {"fastest": vars(fastest), "first_s": times[first], "fastest_s": times[fastest],
            "first_vs_fastest": ratio}  # fmt: skip


def head_to_head_of(report_path: Path, ranks, rounds, steps, warmup) -> None:
    """Add the head-to-head of a written bench_plan.json's first choice and fastest."""
    report = json.loads(report_path.read_text())
    rows = report["rows"]
    fastest = min(rows, key=lambda row: row["measured_s"])
    if fastest is rows[0]:
        print("the first choice is the fastest measured: nothing to compare")
        return
    first, other = Layout(**rows[0]["layout"]), Layout(**fastest["layout"])
    report["head_to_head"] = head_to_head(ranks, first, other, rounds, steps, warmup)
    report_path.write_text(json.dumps(report, indent=1))
    print(f"head to head, {rounds} rounds: first choice "
          f"{report['head_to_head']['first_vs_fastest'] * 100:+.1f}% vs {other}")  # fmt: skip


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(xs):
        order = sorted(range(len(xs)), key=lambda i: xs[i])
        out = [0.0] * len(xs)
        for rank, i in enumerate(order):
            out[i] = float(rank)
        return out

    ra, rb = ranks(a), ranks(b)
    n = len(a)
    d2 = sum((x - y) ** 2 for x, y in zip(ra, rb, strict=True))
    return 1 - 6 * d2 / (n * (n * n - 1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=8, help="steps not timed, at the start")
    parser.add_argument("--out", help="folder for the profiles and bench_plan.json")
    parser.add_argument("--profile", help="reuse this profile (A.json or A.json,B.json,...)")
    parser.add_argument("--first-choices", type=int, default=2,
                        help="the first profile's top layouts measured in every round")  # fmt: skip
    parser.add_argument("--head-to-head", type=int, default=4, metavar="N",
                        help="rounds of the first choice against the fastest measured, side "
                        "by side, after the table (0: none)")  # fmt: skip
    parser.add_argument(
        "--head-to-head-of",
        metavar="BENCH_PLAN_JSON",
        help="only run the head to head of this written report (added to it)",
    )
    args = parser.parse_args()
    if not 0 <= args.warmup < args.steps:
        parser.error(f"--warmup {args.warmup} must be >= 0 and below --steps {args.steps}")
    if args.head_to_head_of:
        rounds = args.head_to_head or 4
        head_to_head_of(Path(args.head_to_head_of), args.ranks, rounds, args.steps, args.warmup)
        return
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_plan_"))
    out.mkdir(parents=True, exist_ok=True)
    config = cfg.build_config({}, cfg.parse_overrides({k: str(v) for k, v in MODEL.items()}))
    spec = get_spec(config.model.arch)
    plan = PlanModel(spec, config.model, config.train.dtype, config.train.global_batch)

    def machine_of(paths: list[str]) -> ProfileMachine:
        return ProfileMachine(load_profiles(paths), groups_of(spec, config.model))

    # a profile before every round (unless one is given): the merged profile has sampled the
    # machine over the same half hour as the runs, not one two-minute spell of it
    profiles = args.profile.split(",") if args.profile else []
    if not profiles:
        profiles.append(str(out / "profile_r1.json"))
        profile(args.ranks, Path(profiles[0]))
    early = search(plan, machine_of(profiles[:1]), args.ranks, top=args.first_choices)
    firsts = [entry.layout for entry in early.ranked[: args.first_choices]]
    layouts = firsts + [Layout(*m) for m in MIX if Layout(*m) not in firsts]
    measured: dict[Layout, list[dict]] = {lay: [] for lay in layouts}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            if r and not args.profile:
                profiles.append(str(out / f"profile_r{r + 1}.json"))
                profile(args.ranks, Path(profiles[-1]))
            for lay in layouts:
                measured[lay].append(measure(args.ranks, lay, args.steps, Path(tmp), args.warmup))
                print(f"round {r + 1} {lay}: {measured[lay][-1]}", flush=True)
        machine = machine_of(profiles)
        first = search(plan, machine, args.ranks, top=5).ranked[0].layout
        if first not in measured:  # the merged profile chose a layout not measured yet
            measured[first] = [measure(args.ranks, first, args.steps, Path(tmp), args.warmup)
                               for _ in range(args.rounds)]  # fmt: skip
            print(f"first choice {first} (measured after the rounds): {measured[first]}")
    layouts = [first] + [lay for lay in layouts if lay != first]
    predicted = {lay: predict(plan, machine, lay).step_s for lay in layouts}
    memory = {lay: max(m["total"] - m.get("comm", 0) for m in memory_of(plan, lay))
              for lay in layouts}  # fmt: skip
    rows = []
    for lay in layouts:
        step = statistics.median(m["step_s"] for m in measured[lay])
        mem = statistics.median(m["memory"] for m in measured[lay])
        rows.append({"layout": vars(lay), "predicted_s": predicted[lay], "measured_s": step,
                     "error": predicted[lay] / step - 1, "predicted_memory": memory[lay],
                     "measured_memory": mem, "memory_error": memory[lay] / mem - 1,
                     "rounds": [m["step_s"] for m in measured[lay]]})  # fmt: skip
    rho = spearman([r["predicted_s"] for r in rows], [r["measured_s"] for r in rows])
    fastest = min(r["measured_s"] for r in rows)
    report = {"rows": rows, "spearman": rho, "first_choice": vars(first),
              "first_choice_vs_fastest": rows[0]["measured_s"] / fastest - 1,
              "profiles": profiles, "machine": machine.profile.machine,
              "steps": args.steps, "warmup": args.warmup}  # fmt: skip
    (out / "bench_plan.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out / 'bench_plan.json'}")
    print(f"{'layout':<58} {'pred':>8} {'meas':>8} {'err':>6} {'pred mem':>9} {'meas mem':>9} "
          f"{'err':>6}")  # fmt: skip
    for r in rows:
        lay = r["layout"]
        name = (
            f"dp{lay['dp']} pp{lay['pp']} tp{lay['tp']} V{lay['virtual']} "
            f"M{lay['microbatches']} {lay['schedule']} rc={lay['recompute']} z{lay['zero']}"
        )
        print(
            f"{name:<58} {r['predicted_s'] * 1e3:>6.0f}ms {r['measured_s'] * 1e3:>6.0f}ms "
            f"{r['error'] * 100:>+5.1f}% {r['predicted_memory'] / 2**20:>7.1f}Mi "
            f"{r['measured_memory'] / 2**20:>7.1f}Mi {r['memory_error'] * 100:>+5.1f}%"
        )
    print(
        f"Spearman {rho:.3f}; planner's first choice ({rows[0]['layout']}) measured "
        f"{report['first_choice_vs_fastest'] * 100:+.1f}% vs the fastest measured"
    )
    if args.head_to_head:
        head_to_head_of(out / "bench_plan.json", args.ranks, args.head_to_head, args.steps,
                        args.warmup)  # fmt: skip


if __name__ == "__main__":
    main()
