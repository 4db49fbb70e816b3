"""Enumerate every layout of a model on N GPUs, reject what cannot run, rank the rest.

Candidates: tp (dividing N, inside a node, a split the family accepts) x pp (dividing N / tp)
x dp (the rest) x micro-batch count M (any divisor of the replica's batch) x schedule and V
(interleaved ones with V chunks per rank) x recomputation x ZeRO (with dp > 1). Rejected, with
the reason: a batch dp does not divide, more stages than layers, a schedule that refuses K/M/V,
a tp the family cannot split, memory (the static state alone for every candidate, cheaply; then
the full model, activations included, for those the search visits).

Ranking is branch and bound: candidates in order of a lower bound on their step time (the
busiest rank's compute); each is checked for memory and simulated; the search stops when the
next bound exceeds the K-th best predicted time, so large searches (1,024 GPUs, K = 64) only
simulate the few dozen layouts that can still win.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import Counter
from dataclasses import dataclass, field, replace

from hpcpipe.pipeline.schedule import ScheduleError
from hpcpipe.plan import flops
from hpcpipe.plan.memory import layout_memory
from hpcpipe.plan.timemodel import Layout, PlanModel, check_schedule, lower_bound, predict
from hpcpipe.train.memory import predict_static

PIPELINE_SCHEDULES = ("gpipe", "1f1b", "zb-h1", "zb-h2")
INTERLEAVED_SCHEDULES = ("interleaved", "interleaved-zb")
V_SHAPE_SCHEDULES = ("zb-v",)  # two chunks per rank, r and 2K - 1 - r
RECOMPUTE = ("false", "selective", "full")
USABLE_MEMORY = 0.9  # of a GPU's memory: CUDA context, NCCL buffers, allocator fragmentation


@dataclass
class Rejected:
    """A layout (or a whole family of them) that cannot run, and why."""

    what: dict
    category: str  # memory | divisibility | layers | schedule | tp
    reason: str


@dataclass
class Ranked:
    """A layout with its prediction and memory."""

    layout: Layout
    step_s: float
    bubble: float
    dp_exposed_s: float
    optimizer_s: float
    memory_per_rank: list[dict]
    fits: bool
    prediction: object = None

    @property
    def memory_bytes_per_gpu(self) -> int:
        return max(int(r["total"]) for r in self.memory_per_rank)


@dataclass
class SearchResult:
    params: int
    model_flops_per_step: float
    ranked: list[Ranked]  # fitting, best first (top K)
    unfit: list[Ranked]  # visited, did not fit memory, best first
    rejected: list[Rejected]
    counts: Counter = field(default_factory=Counter)
    simulated: int = 0
    candidates: int = 0


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _degrees(plan, gpus, gpus_per_node, fixed, rejected):
    """(tp, pp, dp) triples, rejecting the tp degrees that cannot work."""
    tp_plan = plan.spec.tp_plan()
    for tp in divisors(gpus):
        if fixed.get("tp") not in (None, tp):
            continue
        what = {"tp": tp}
        if tp > gpus_per_node:
            rejected.append(Rejected(what, "tp", f"tp={tp} > {gpus_per_node} GPUs per node: "
                                     "tensor parallelism stays inside a node"))  # fmt: skip
            continue
        if tp > 1:
            try:
                if tp_plan is None:
                    raise ValueError(f"model.arch={plan.spec.name!r} has no tensor-parallel plan")
                tp_plan.check(plan.model, tp)
            except ValueError as exc:
                rejected.append(Rejected(what, "tp", str(exc)))
                continue
        for pp in divisors(gpus // tp):
            dp = gpus // (tp * pp)
            if fixed.get("pp") not in (None, pp) or fixed.get("dp") not in (None, dp):
                continue
            yield tp, pp, dp


def _schedules(pp: int, num_layers: int, max_virtual: int):
    """(schedule, V) pairs worth trying at pp ranks (pp = 1: one rank, no pipeline)."""
    if pp == 1:
        yield "1f1b", 1
        return
    for name in PIPELINE_SCHEDULES:
        yield name, 1
    for name in INTERLEAVED_SCHEDULES:
        for v in range(2, max_virtual + 1):
            yield name, v
    if max_virtual >= 2:
        for name in V_SHAPE_SCHEDULES:
            yield name, 2


def enumerate_layouts(plan, gpus, gpus_per_node, fixed, rejected, max_virtual=4):
    """Every candidate Layout; what cannot run goes to `rejected`."""
    recompute = [r for r in RECOMPUTE if r != "selective" or plan.selective]
    for tp, pp, dp in _degrees(plan, gpus, gpus_per_node, fixed, rejected):
        degrees = {"dp": dp, "pp": pp, "tp": tp}
        if plan.global_batch % dp:
            rejected.append(Rejected(degrees, "divisibility", f"global batch "
                            f"{plan.global_batch} is not divisible by dp={dp}"))  # fmt: skip
            continue
        replica = plan.global_batch // dp
        for name, v in _schedules(pp, plan.num_layers, max_virtual):
            what = {**degrees, "schedule": name, "virtual": v}
            if pp * v > plan.num_layers:
                rejected.append(Rejected(what, "layers", f"{plan.num_layers} layers cannot "
                                f"fill pp x V = {pp * v} stages"))  # fmt: skip
                continue
            for m in divisors(replica):
                if fixed.get("microbatches") not in (None, m):
                    continue
                try:
                    check_schedule(name, pp, m, v)
                except ScheduleError as exc:
                    rejected.append(Rejected({**what, "microbatches": m}, "schedule", str(exc)))
                    continue
                for r in recompute:
                    for z in (0, 1) if dp > 1 else (0,):
                        yield Layout(dp, pp, tp, v, m, name, r, z)


def static_bytes(plan: PlanModel, layout: Layout) -> tuple[int, int]:
    """(rank, bytes) of the pipeline rank with the most parameters, gradients and optimizer
    state: a cheap lower bound on its memory."""
    stages = plan.partition(layout.pp * layout.virtual)
    worst = (0, 0)
    for r in range(layout.pp):
        numel = sum(plan.stage_params(stages[s]) for s in range(r, len(stages), layout.pp))
        static = predict_static(math.ceil(numel / layout.tp), plan.dtype, layout.zero, layout.dp)
        worst = max(worst, (sum(static.values()), -r))
    return -worst[1], worst[0]


def memory_of(plan: PlanModel, layout: Layout) -> list[dict]:
    stages = plan.partition(layout.pp * layout.virtual)
    return layout_memory(
        plan.spec, plan.model, dtype=plan.dtype, dp=layout.dp, pp=layout.pp, tp=layout.tp,
        virtual=layout.virtual, microbatches=layout.microbatches,
        microbatch_size=layout.microbatch_size(plan.global_batch), schedule_name=layout.schedule,
        recompute=layout.recompute, zero=layout.zero, partition=[len(s) for s in stages],
    )  # fmt: skip


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def search(plan, machine, gpus, gpus_per_node=None, fixed=None, top=10, max_virtual=4,
           memory_limit=None) -> SearchResult:  # fmt: skip
    """Rank the layouts of `plan` on `gpus` GPUs of `machine`; keep the `top` best that fit."""
    fixed = dict(fixed or {})
    gpus_per_node = gpus_per_node or machine.gpus_per_node
    limit = memory_limit or machine.memory_bytes * USABLE_MEMORY
    rejected: list[Rejected] = []
    result = SearchResult(
        params=flops.param_count(plan.spec, plan.model),
        model_flops_per_step=flops.model_flops_per_step(plan.spec, plan.model, plan.global_batch),
        ranked=[], unfit=[], rejected=rejected,
    )  # fmt: skip
    queue = []
    for layout in enumerate_layouts(plan, gpus, gpus_per_node, fixed, rejected, max_virtual):
        result.candidates += 1
        if layout.recompute != RECOMPUTE[0]:
            continue  # queued only if the layout without (less) recomputation does not fit
        _push(queue, plan, machine, layout, limit, rejected)
    best: list[float] = []  # max-heap (negated) of the top predicted step times
    skipped = 0
    while queue:
        bound, _, layout = heapq.heappop(queue)
        if len(best) >= top and bound > -best[0]:
            skipped += len(queue) + 1
            break
        prediction = predict(plan, machine, layout)
        result.simulated += 1
        if len(best) >= top and prediction.step_s > -best[0]:
            skipped += 1  # slower than the top K; more recomputation would be slower still
            continue
        ranked = _rank(plan, layout, prediction, limit)
        if ranked.fits:
            result.ranked.append(ranked)
            heapq.heappush(best, -ranked.step_s)
            if len(best) > top:
                heapq.heappop(best)
            continue
        result.unfit.append(ranked)
        worst = max(ranked.memory_per_rank, key=lambda r: r["total"])
        rejected.append(
            Rejected(
                vars(layout),
                "memory",
                f"{_gib(worst['total'])} on "
                f"pipeline rank {worst['pp_rank']} > {_gib(limit)} usable",
            )
        )
        more = _more_recompute(layout, plan)
        if more is not None:  # the same layout holding fewer activations, a little slower
            _push(queue, plan, machine, more, limit, rejected)
    result.ranked.sort(key=lambda r: r.step_s)
    result.ranked = result.ranked[:top]
    result.unfit.sort(key=lambda r: r.step_s)
    result.unfit = result.unfit[:top]
    result.counts.update(r.category for r in rejected)
    result.counts[SKIPPED] = skipped
    return result


SKIPPED = "not simulated (bound above the top K)"
_ORDER = itertools.count()  # ties in the queue go first-come first-served


def _more_recompute(layout: Layout, plan: PlanModel) -> Layout | None:
    """The next recomputation mode (false -> selective -> full) this family supports."""
    options = [r for r in RECOMPUTE if r != "selective" or plan.selective]
    i = options.index(layout.recompute)
    return replace(layout, recompute=options[i + 1]) if i + 1 < len(options) else None


def _push(queue, plan, machine, layout, limit, rejected) -> None:
    """Queue `layout` by its lower bound, unless its static state alone does not fit."""
    rank, static = static_bytes(plan, layout)
    if static > limit:
        rejected.append(Rejected(vars(layout), "memory", f"parameters, gradients and "
                        f"optimizer state alone take {_gib(static)} on pipeline rank {rank} "
                        f"> {_gib(limit)} usable"))  # fmt: skip
        return
    heapq.heappush(queue, (lower_bound(plan, machine, layout), next(_ORDER), layout))


def _rank(plan, layout, prediction, limit) -> Ranked:
    memory = memory_of(plan, layout)
    fits = max(r["total"] for r in memory) <= limit
    return Ranked(layout, prediction.step_s, prediction.bubble, prediction.dp_exposed_s,
                  prediction.optimizer_s, memory, fits, prediction)  # fmt: skip
