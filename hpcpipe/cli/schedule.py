"""`hpcpipe schedule`: build, simulate and render a schedule in the requested format."""

from __future__ import annotations

import json

from hpcpipe.pipeline import draw, twobw
from hpcpipe.pipeline.autoschedule import AUTO
from hpcpipe.pipeline.schedule import (
    FORWARD_SCHEDULES,
    SPLIT_BACKWARD,
    build_schedule,
    csv_dimensions,
    load_csv_schedule,
    read_csv_schedule,
    render_grid,
    to_csv,
    uses_split_backward,
)
from hpcpipe.pipeline.simulate import Costs, fit_costs, simulate
from hpcpipe.pipeline.trace import compute_timeline, read_trace


def costs_for(args, name: str, split: bool | None = None) -> tuple[Costs, dict]:
    """Costs from --fit (a measured trace) or --costs; W folds into B without the split
    (split: whether the schedule splits its backwards; default: whether `name` does)."""
    if args.fit:
        meta, events = read_trace(args.fit)
        costs = fit_costs(compute_timeline(events), V=meta["V"])
        source = {"fitted_from": args.fit, "measured": meta}
    else:
        costs, source = Costs.parse(args.costs), {}
    if name in FORWARD_SCHEDULES:  # no backward: the ideal step is M forwards
        costs = Costs(costs.t_f, 0.0, 0.0, costs.t_comm)
    elif not (name in SPLIT_BACKWARD if split is None else split) and costs.t_w:
        # NOTE: schedules without W run the weight gradient inside B.
        costs = Costs(costs.t_f, costs.t_b + costs.t_w, 0.0, costs.t_comm)
    return costs, source


def _sizes(args) -> tuple[int, int, int]:
    K, M = args.stages, args.microbatches
    if args.fit and (K is None or M is None):
        meta, _ = read_trace(args.fit)
        K, M = K or meta["K"], M or meta["M"]
    if K is None or M is None:
        raise ValueError("--stages and --microbatches are required (or --fit TRACE)")
    return K, M, args.virtual


def _schedule(args):
    """(K, M, V, the validated schedule): --schedule's, or the one in --csv."""
    if not args.csv:
        K, M, V = _sizes(args)
        if args.schedule != AUTO:
            return K, M, V, build_schedule(args.schedule, K, M, V)
        costs, _ = costs_for(args, args.schedule, split=True)  # W stays W: it may be split
        schedule = build_schedule(AUTO, K, M, V, costs=costs, memory_limit=args.memory_limit)
        return K, M, V, schedule
    K, M, V = csv_dimensions(read_csv_schedule(args.csv))
    return K, M, V, load_csv_schedule(args.csv, K, M, V)


def render_measured(args) -> str | None:
    """A measured trace's own timeline, as a PNG or a Chrome trace."""
    meta, events = read_trace(args.measured)
    timeline = compute_timeline(events)
    if args.format == "chrome":
        return json.dumps(draw.to_chrome_trace(timeline, meta["K"], draw.timeline_arrows(timeline)))
    if args.format != "png" or not args.out:
        raise ValueError("--measured draws --format png --out FILE.png (or --format chrome)")
    step_ms = meta["step_time"] * 1e3
    title = (f"measured {meta['schedule']} K={meta['K']} M={meta['M']} V={meta['V']}: "
             f"bubble {meta['measured_bubble']:.3f}, step {step_ms:.0f} ms")  # fmt: skip
    draw.to_png(timeline, meta["K"], args.out, title=title, xlabel="seconds")
    return None


def render_two_bw(args) -> str | None:
    """2BW: csv is the program of every step (forwards >= M: the next batch's); the grid,
    json, chrome and png formats show STEPS_SHOWN steps in a row (one schedule over their
    batches), and json's step_time and bubble_rate are the full pipeline's, per step."""
    K, M, V = _sizes(args)
    step = build_schedule(twobw.NAME, K, M, V)
    if args.format == "csv":
        return to_csv(step, compute_only=args.compute_only)
    shown = twobw.unrolled(K, M, STEPS_SHOWN)
    if args.format == "grid":
        return render_grid(shown, K, STEPS_SHOWN * M, V)
    costs, source = costs_for(args, args.schedule, split=False)
    step_time, bubble, sim = twobw.steady_state(K, M, costs, STEPS_SHOWN)
    if args.format == "json":
        out = draw.to_json(shown, K, STEPS_SHOWN * M, V, sim)
        out.update(
            name=twobw.NAME,
            steps_shown=STEPS_SHOWN,
            bubble_rate=bubble,
            step_time=step_time,
            peak_activations=[twobw.peak_activations(K, M)[r] for r in range(K)],
            costs=[costs.t_f, costs.t_b, costs.t_w, costs.t_comm],
            **source,
        )
        return json.dumps(out, indent=1)
    if args.format == "chrome":
        return json.dumps(draw.to_chrome_trace(sim.timeline, K, draw.timeline_arrows(sim.timeline)))
    if not args.out:
        raise ValueError("--format png needs --out FILE.png")
    title = f"2bw K={K} M={M}, {STEPS_SHOWN} steps: bubble {bubble:.3f} per step once full"
    draw.to_png(sim.timeline, K, args.out, title=title)
    return None


STEPS_SHOWN = 3  # 2BW never drains: a few steps in a row show its steady state


def render(args) -> str | None:
    """The text to print (None when a file was written)."""
    if args.measured:
        return render_measured(args)
    Costs.parse(args.costs)  # refuse a bad --costs whatever the format
    if args.schedule == twobw.NAME and not args.csv:
        return render_two_bw(args)
    K, M, V, schedule = _schedule(args)
    if args.format == "grid":
        return render_grid(schedule, K, M, V)
    if args.format == "csv":
        return to_csv(schedule, compute_only=args.compute_only)
    costs, source = costs_for(args, args.schedule, uses_split_backward(schedule))
    sim = simulate(schedule, K, M, V, costs)
    if args.format == "json":
        out = draw.to_json(schedule, K, M, V, sim)
        out.update(
            name=args.csv or args.schedule,
            bubble_rate=sim.bubble_rate,
            step_time=sim.step_time,
            peak_activations=[sim.peak_activations[r] for r in range(K)],
            costs=[costs.t_f, costs.t_b, costs.t_w, costs.t_comm],
            **source,
        )
        return json.dumps(out, indent=1)
    if args.format == "chrome":
        return json.dumps(draw.to_chrome_trace(sim.timeline, K, draw.timeline_arrows(sim.timeline)))
    if not args.out:
        raise ValueError("--format png needs --out FILE.png")
    title = f"{args.csv or args.schedule} K={K} M={M} V={V}: bubble {sim.bubble_rate:.3f}"
    draw.to_png(sim.timeline, K, args.out, title=title)
    return None
