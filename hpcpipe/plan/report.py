"""What `hpcpipe plan` prints: the ranked table, the JSON object, and --explain."""

from __future__ import annotations

from collections import defaultdict

from hpcpipe.plan.search import SKIPPED, Ranked, SearchResult
from hpcpipe.plan.timemodel import PlanModel


def _metrics(r: Ranked, result: SearchResult, plan: PlanModel, machine, gpus: int) -> dict:
    tokens = plan.global_batch * plan.model.seq_len
    tflops = result.model_flops_per_step / r.step_s / gpus / 1e12
    peak = machine.peak_tflops(plan.dtype_name)
    return {
        "tokens_per_s": tokens / r.step_s,
        "tflops_per_gpu": tflops,
        "mfu": tflops / peak if peak else None,
    }


def layout_json(r: Ranked, result, plan, machine, gpus) -> dict:
    """One layout as --format json lists it."""
    lay = r.layout
    return {
        "dp": lay.dp, "pp": lay.pp, "tp": lay.tp, "virtual": lay.virtual,
        "microbatches": lay.microbatches,
        "microbatch_size": lay.microbatch_size(plan.global_batch),
        "schedule": lay.schedule, "recompute": lay.recompute, "zero": lay.zero,
        "predicted_step_s": r.step_s,
        **_metrics(r, result, plan, machine, gpus),
        "bubble": r.bubble,
        "dp_exposed_s": r.dp_exposed_s,
        "optimizer_s": r.optimizer_s,
        "memory_bytes_per_gpu": r.memory_bytes_per_gpu,
        "memory_per_rank": [
            {k: int(v) for k, v in m.items() if isinstance(v, (int, float))}
            for m in r.memory_per_rank
        ],
        "fits": r.fits,
        "train_flags": lay.flags(),
    }  # fmt: skip


def _rejection_summary(result: SearchResult, examples: int = 3) -> dict[str, dict]:
    by_category: dict[str, list] = defaultdict(list)
    for rej in result.rejected:
        by_category[rej.category].append(rej)
    return {
        cat: {
            "count": len(items),
            "examples": [{"layout": rej.what, "reason": rej.reason} for rej in items[:examples]],
        }
        for cat, items in sorted(by_category.items())
    }


def to_json(result: SearchResult, plan, machine, gpus: int, elapsed: float) -> dict:
    """The --format json object: params, model_flops_per_step, layouts (best first), ..."""
    shown = result.ranked or result.unfit  # nothing fits: the best that do not, fits = false
    return {
        "model": {"arch": plan.spec.name, **_model_keys(plan)},
        "dtype": plan.dtype_name,
        "global_batch": plan.global_batch,
        "gpus": gpus,
        "device": machine.name,
        "params": result.params,
        "model_flops_per_step": result.model_flops_per_step,
        "layouts": [layout_json(r, result, plan, machine, gpus) for r in shown],
        "candidates": result.candidates,
        "simulated": result.simulated,
        "rejected": _rejection_summary(result),
        "not_simulated": result.counts.get(SKIPPED, 0),
        "search_s": elapsed,
    }


def _model_keys(plan) -> dict:
    import dataclasses

    return {f.name: getattr(plan.model, f.name) for f in dataclasses.fields(plan.model)}


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def _seconds(s: float) -> str:
    return f"{s:.3f} s" if s >= 1 else f"{s * 1e3:.1f} ms"


def table(result: SearchResult, plan, machine, gpus: int, elapsed: float) -> str:
    """The ranked layouts as a text table, then what was rejected and why."""
    lines = [
        f"{plan.spec.name}: {result.params / 1e9:.3g}B parameters, "
        f"{result.model_flops_per_step:.3e} model FLOPs per step "
        f"({plan.global_batch} x {plan.model.seq_len} tokens, {plan.dtype_name}) on {gpus} x "
        f"{machine.name}",
        f"{result.candidates} candidate layouts, {result.simulated} simulated, "
        f"searched in {elapsed:.1f} s",
        "",
    ]
    shown = result.ranked or result.unfit
    if not result.ranked:
        lines.append("NO LAYOUT FITS; the fastest of those that do not:")
    head = (f"{'#':>2} {'dp':>3} {'pp':>3} {'tp':>3} {'V':>2} {'M':>4} {'mbs':>3} "
            f"{'schedule':<14} {'recompute':<9} {'zero':>4} {'step':>9} {'tokens/s':>10} "
            f"{'TFLOP/s':>8} {'MFU':>6} {'bubble':>6} {'mem/GPU':>10}")  # fmt: skip
    lines.append(head)
    for i, r in enumerate(shown, 1):
        lay, m = r.layout, _metrics(r, result, plan, machine, gpus)
        mfu = f"{m['mfu'] * 100:5.1f}%" if m["mfu"] is not None else "   n/a"
        lines.append(
            f"{i:>2} {lay.dp:>3} {lay.pp:>3} {lay.tp:>3} {lay.virtual:>2} {lay.microbatches:>4} "
            f"{lay.microbatch_size(plan.global_batch):>3} {lay.schedule:<14} "
            f"{lay.recompute:<9} {lay.zero:>4} {_seconds(r.step_s):>9} "
            f"{m['tokens_per_s']:>10,.0f} {m['tflops_per_gpu']:>8.2f} {mfu:>6} "
            f"{r.bubble:>6.3f} {_bytes(r.memory_bytes_per_gpu):>10}"
        )
    if shown:
        lines += ["", "run the first with: hpcpipe train " + " ".join(shown[0].layout.flags())]
    summary = _rejection_summary(result, examples=1)
    if summary or result.counts.get(SKIPPED):
        lines += ["", "rejected:"]
        for cat, info in summary.items():
            ex = info["examples"][0]
            lines.append(f"  {cat}: {info['count']} (e.g. {ex['layout']}: {ex['reason']})")
        skipped = result.counts.get(SKIPPED, 0)
        if skipped:
            lines.append(f"  not simulated: {skipped} (their lower bound is above the top "
                         f"{len(result.ranked)})")  # fmt: skip
    return "\n".join(lines)


def explain(chosen: Ranked, plan, machine, png_path: str) -> str:
    """Draw the chosen layout's simulated timeline; describe its time and memory per rank."""
    from hpcpipe.pipeline.draw import to_png
    from hpcpipe.plan.timemodel import predict

    lay = chosen.layout
    sim = predict(plan, machine, lay, keep_timeline=True).sim
    title = (f"{plan.spec.name} dp={lay.dp} pp={lay.pp} tp={lay.tp} V={lay.virtual} "
             f"M={lay.microbatches} {lay.schedule} recompute={lay.recompute} zero={lay.zero}: "
             f"predicted {_seconds(chosen.step_s)}")  # fmt: skip
    to_png(sim.timeline, lay.pp, png_path, title=title, xlabel="seconds")
    lines = [
        f"explain: {title}",
        f"  timeline drawn to {png_path}",
        f"  pipeline {_seconds(chosen.prediction.pipeline_s)}, bubble {chosen.bubble:.3f}, "
        f"dp reduction exposed {_seconds(chosen.dp_exposed_s)}, optimizer "
        f"{_seconds(chosen.optimizer_s)}",
        "  memory per pipeline rank (per GPU):",
        f"  {'rank':>4} {'params':>10} {'grads':>10} {'optimizer':>10} {'activations':>12} "
        f"{'comm':>10} {'total':>10}",
    ]
    for m in chosen.memory_per_rank:
        lines.append(
            f"  {m['pp_rank']:>4} {_bytes(m['params']):>10} {_bytes(m['grads']):>10} "
            f"{_bytes(m['optimizer']):>10} {_bytes(m['activations']):>12} "
            f"{_bytes(m.get('comm', 0)):>10} {_bytes(m['total']):>10}"
        )
    return "\n".join(lines)
