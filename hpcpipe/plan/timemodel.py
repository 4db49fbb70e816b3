"""Predicted step time of one layout: per-stage costs, the pipeline simulator, dp and optimizer.

A step is: the schedule's compute actions on every pipeline rank (per-stage F, B, W from the
machine's layer times; messages between ranks cost one p2p hop of the boundary activation),
then on each rank the data-parallel reduction of its gradients, which starts as each chunk's
last backward finishes (hpcpipe's buckets launch when final) and so hides behind what that rank
still computes, then the optimizer step over its parameters (1/dp of them under ZeRO-1, followed
by the all-gather of the updated parameters), plus a fixed per-step overhead. The slowest rank
sets the step. On machines whose processes share cores (a profile of this CPU), the simulator
shares the cores among the busy processes (each pipeline rank stands for its tp x dp processes).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from hpcpipe.config import HALF, TORCH_DTYPES
from hpcpipe.models import api
from hpcpipe.pipeline.partition import partition_layers
from hpcpipe.pipeline.schedule import (
    SCHEDULES,
    SPLIT_BACKWARD,
    V_SHAPE,
    Kind,
    ScheduleError,
    interleaved_round,
    named_placement,
    stages_of,
)
from hpcpipe.pipeline.simulate import SimResult, simulate_stages
from hpcpipe.plan.machines import element_size


@dataclass(frozen=True)
class Layout:
    """One way to run the model: degrees, chunks, micro-batches, schedule, memory savers."""

    dp: int
    pp: int
    tp: int
    virtual: int
    microbatches: int
    schedule: str
    recompute: str
    zero: int

    def microbatch_size(self, global_batch: int) -> int:
        return global_batch // (self.dp * self.microbatches)

    def flags(self) -> list[str]:
        """The `hpcpipe train` flags that run this layout."""
        return [
            f"--dp={self.dp}", f"--pp={self.pp}", f"--tp={self.tp}",
            f"--schedule={self.schedule}", f"--microbatches={self.microbatches}",
            f"--schedule.virtual={self.virtual}", f'--schedule.recompute="{self.recompute}"',
            f"--parallel.zero={self.zero}",
        ]  # fmt: skip


@dataclass
class Prediction:
    """What the time model says about one layout."""

    step_s: float
    pipeline_s: float  # the slowest rank's compute span (incl. waits)
    dp_exposed_s: float  # reduction time not hidden behind compute
    optimizer_s: float
    bubble: float
    sim: SimResult | None  # the timeline, when asked for (predict(keep_timeline=True))


class PlanModel:
    """A model to plan for: its family, config, dtype, global batch and per-layer facts."""

    def __init__(self, spec: api.ModelSpec, model, dtype: str, global_batch: int,
                 balance: str = "params"):  # fmt: skip
        self.spec, self.model, self.dtype_name = spec, model, dtype
        self.dtype = TORCH_DTYPES[dtype]
        self.global_batch = global_batch
        self.balance = balance
        self.num_layers = spec.num_layers(model)
        self.layer_costs = api.layer_costs(spec, model, balance)
        self.layer_params = api.param_costs(spec, model)
        self.half = self.dtype in HALF
        self.stage_cost_cache: dict = {}
        self.run_cache: dict = {}
        self.selective = api.supports_selective_recompute(spec, model)

    @functools.cache  # noqa: B019 - one PlanModel per search
    def partition(self, num_stages: int) -> tuple[range, ...]:
        """The trainer's partition of the layers into num_stages stages."""
        p = partition_layers(self.layer_costs, num_stages)
        return tuple(p.layers(s) for s in range(num_stages))

    def boundary_bytes(self, batch: int) -> int:
        shape = self.spec.boundary_shape(self.model, batch)
        return math.prod(shape) * element_size(self.dtype)

    def tp_comm(self, index: int, tp: int, batch: int) -> tuple[int, int]:
        """All-reduces per pass of layer `index` under tp and their bytes (Megatron's: two
        per block, one for the vocabulary-parallel embedding; the head's are loss scalars)."""
        if tp == 1 or index == self.num_layers - 1:
            return 0, 0
        return (1 if index == 0 else 2), self.boundary_bytes(batch)

    def stage_params(self, layers: range) -> float:
        return math.fsum(self.layer_params[i] for i in layers)


@functools.lru_cache(maxsize=256)
def cached_schedule(name: str, K: int, M: int, V: int):
    """The compute actions of a built-in schedule (no sends/receives, not validated again:
    tests/test_schedule.py validates every builder; the planner builds thousands)."""
    return SCHEDULES[name](K, M, V)


def check_schedule(name: str, K: int, M: int, V: int) -> None:
    """Raise the ScheduleError the builder would, without building (the sizes it refuses)."""
    if name.startswith("interleaved"):
        interleaved_round(K, M)
    elif name in V_SHAPE:
        if V != 2:
            raise ScheduleError(f"{name} needs V=2 (two chunks per rank, the V shape), got V={V}")
    elif V != 1:
        raise ScheduleError(f"{name} supports only V=1 (one chunk per rank), got V={V}")


def stage_costs(plan: PlanModel, machine, layout: Layout) -> list[tuple[float, float, float]]:
    """(F, B, W) of one micro-batch through each stage; B is the whole backward (W folded in)
    for schedules without the split; full recomputation redoes the forward in B."""
    batch = layout.microbatch_size(plan.global_batch)
    split = layout.schedule in SPLIT_BACKWARD
    procs = layout.dp * layout.pp * layout.tp
    key = (
        id(machine),
        layout.pp * layout.virtual,
        layout.tp,
        batch,
        split,
        layout.recompute,
        procs,
    )
    if key not in plan.stage_cost_cache:
        plan.stage_cost_cache[key] = _stage_costs(plan, machine, layout, batch, split)
    return plan.stage_cost_cache[key]


def _stage_costs(plan, machine, layout, batch, split) -> list[tuple[float, float, float]]:
    processes = layout.dp * layout.pp * layout.tp
    out = []
    for layers in plan.partition(layout.pp * layout.virtual):
        f = b = w = 0.0
        for i in layers:
            comm = plan.tp_comm(i, layout.tp, batch)
            t = machine.layer_times(plan.spec, plan.model, i, layout.tp, batch, plan.dtype,
                                    layout.recompute, comm, processes)  # fmt: skip
            f += t.f
            b += t.b if split else t.bw
            w += t.w if split else 0.0
        if layout.recompute == "full":
            b += f
        out.append((f, b, w))
    return out


@dataclass(frozen=True)
class PipelineRun:
    """What the time model needs of a simulated step (not the whole timeline: the search
    caches these for hundreds of layouts of up to 10^5 actions)."""

    rank_end: tuple[float, ...]  # per rank: when its last action ends
    last_backward: tuple[tuple[float, float, int, int], ...]  # (end, duration, stage, rank)
    bubble: float


def _summarize_run(sim: SimResult, K: int) -> PipelineRun:
    """Per rank its end; per stage its last backward action (B or W) and its duration."""
    rank_end = [0.0] * K
    last: dict[int, tuple[float, float, int]] = {}
    backward = (Kind.B, Kind.I, Kind.W)
    for t in sim.timeline:
        if t.end > rank_end[t.rank]:
            rank_end[t.rank] = t.end
        if t.action.kind in backward:
            s = t.action.stage
            if s not in last or t.end >= last[s][0]:
                last[s] = (t.end, t.end - t.start, t.rank)
    chunks = tuple((end, dur, s, r) for s, (end, dur, r) in sorted(last.items()))
    return PipelineRun(tuple(rank_end), chunks, sim.bubble_rate)


def simulate_layout(plan, machine, layout, keep_timeline=False):
    """The pipeline of `layout` simulated: (PipelineRun, SimResult or None). Cached on the
    plan by everything the simulation sees (ZeRO variants of a layout share one)."""
    K, M, V = layout.pp, layout.microbatches, layout.virtual
    costs = stage_costs(plan, machine, layout)
    batch = layout.microbatch_size(plan.global_batch)
    pp_intra = layout.tp * K <= machine.gpus_per_node
    hop = machine.p2p(plan.boundary_bytes(batch), pp_intra) if K > 1 else 0.0
    procs = layout.tp * layout.dp
    key = (layout.schedule, K, M, V, tuple(costs), hop, procs if machine.speed else 1)
    if key in plan.run_cache and not keep_timeline:
        return plan.run_cache[key], None
    schedule = cached_schedule(layout.schedule, K, M, V)
    sim = simulate_stages(schedule, K, M, V, costs, hop, speed=machine.speed,
                          procs_per_rank=procs, peaks=False)  # fmt: skip
    plan.run_cache[key] = _summarize_run(sim, K)
    return plan.run_cache[key], (sim if keep_timeline else None)


BUCKET_BYTES = 25 * 2**20  # GradReducer's default bucket size


def _layer_buckets(plan, layout, layers: range, grad_size: int) -> list[tuple[int, float, int]]:
    """(layer, bytes, count): the gradient buckets of a chunk in the order they become final,
    as GradReducer builds them (the chunk's parameters in reverse, closed at 25 MiB); a bucket
    is final when its earliest layer's backward is done. Layers are the granularity here: a
    layer larger than a bucket is its own `count` buckets, final together."""
    out, pending, size = [], None, 0.0
    for i in reversed(layers):
        nbytes = plan.layer_params[i] / layout.tp * grad_size
        if nbytes >= BUCKET_BYTES:
            if pending is not None:
                out.append((pending, size, 1))
                pending, size = None, 0.0
            out.append((i, nbytes, math.ceil(nbytes / BUCKET_BYTES)))
            continue
        if pending is not None and size + nbytes > BUCKET_BYTES:
            out.append((pending, size, 1))
            size = 0.0
        pending, size = i, size + nbytes
    if pending is not None:
        out.append((pending, size, 1))
    return out


def _reduction_end(plan, machine, layout, run: PipelineRun, intra) -> dict[int, float]:
    """When each rank's last gradient bucket is reduced: buckets become final during their
    chunk's last backward action (the last layers' first; time inside the action in
    proportion to the parameters done), reduced one after another on the dp axis."""
    if layout.dp == 1:
        return {}
    grad_size = 4 if plan.half else element_size(plan.dtype)
    stages = plan.partition(layout.pp * layout.virtual)
    reduce = machine.reduce_scatter if layout.zero else machine.allreduce
    ends: dict[int, float] = {}
    for end, dur, s, rank in sorted(run.last_backward):
        layers = stages[s]
        total = plan.stage_params(layers) or 1.0
        free, done = ends.get(rank, 0.0), 0.0
        for layer, nbytes, count in _layer_buckets(plan, layout, layers, grad_size):
            done = plan.stage_params(range(layer, layers[-1] + 1))
            ready = end - dur * (1 - done / total)
            free = max(free, ready) + count * reduce(layout.dp, nbytes / count, intra)
        ends[rank] = free
    return ends


def _tied_sum(plan, machine, layout) -> float:
    """Tied embeddings: the first and last stages sum their copies' gradients each step."""
    groups = plan.spec.tie_groups(plan.model)
    if not groups or layout.pp * layout.virtual == 1:
        return 0.0
    d = getattr(plan.model, "d_model", 0)
    nbytes = plan.model.vocab_size * d / layout.tp * (4 if plan.half else element_size(plan.dtype))
    return machine.allreduce(2, nbytes, intra=False)


def predict(plan: PlanModel, machine, layout: Layout, keep_timeline=False) -> Prediction:
    """The predicted step time of `layout` on `machine` (keep_timeline: with the simulated
    timeline in .sim, for drawing)."""
    K = layout.pp
    run, sim = simulate_layout(plan, machine, layout, keep_timeline)
    dp_intra = layout.tp * K * layout.dp <= machine.gpus_per_node
    reduced = _reduction_end(plan, machine, layout, run, dp_intra)
    tied = _tied_sum(plan, machine, layout)
    step = exposed_max = optimizer_max = 0.0
    for r in range(K):
        end = run.rank_end[r]
        done = max(end, reduced.get(r, 0.0)) + (tied if r in (0, K - 1) else 0.0)
        optimizer = optimizer_time(plan, machine, layout, r)
        step = max(step, done + optimizer)
        exposed_max = max(exposed_max, done - end)
        optimizer_max = max(optimizer_max, optimizer)
    step += machine.step_overhead
    return Prediction(step, max(run.rank_end), exposed_max, optimizer_max, run.bubble, sim)


def lower_bound(plan: PlanModel, machine, layout: Layout) -> float:
    """A step time no simulation can beat, used to skip layouts that cannot reach the top K.

    Rank r cannot start before the first micro-batch's forward reached it (the stages before
    it and their hops) and must then do all its work at no more than a process's solo speed
    (and, see below, wait for the drain), then its optimizer step; on shared cores, all
    processes' work cannot go faster than the machine's best total throughput either.
    """
    costs = stage_costs(plan, machine, layout)
    K, M = layout.pp, layout.microbatches
    batch = layout.microbatch_size(plan.global_batch)
    hop = machine.p2p(plan.boundary_bytes(batch), layout.tp * K <= machine.gpus_per_node)
    per_rank = [0.0] * K
    place = named_placement(layout.schedule, K, layout.virtual)
    for s, (f, b, w) in enumerate(costs):
        per_rank[place[s]] += M * (f + b + w)
    speed = machine.speed
    solo = speed[min(layout.tp * layout.dp, len(speed)) - 1] if speed else 1.0
    # Without a split backward, a rank's last action is its first chunk's B of the last
    # micro-batch, and the stages before it still run theirs after it: a drain as long as
    # the fill (1F1B's bound is then exact: (M + K - 1)(F + B) for equal stages).
    drains = layout.schedule not in SPLIT_BACKWARD
    bound = fill = drain = 0.0
    for r in range(K):
        optimizer = optimizer_time(plan, machine, layout, r)
        idle = fill + (drain if drains else 0.0)
        bound = max(bound, (idle + per_rank[r]) / solo + r * hop * (2 if drains else 1) + optimizer)
        fill += costs[r][0]  # stage r's forward of the first micro-batch
        drain += costs[r][1]  # and its backward of the last
    if speed:
        procs = layout.tp * layout.dp
        best = max(n * speed[n - 1] for n in range(1, len(speed) + 1))
        bound = max(bound, sum(per_rank) * procs / best)
    return bound


def rank_numel(plan: PlanModel, layout: Layout, rank: int) -> float:
    """Parameters one GPU of pipeline rank `rank` holds (its chunks' share under tp)."""
    stages = plan.partition(layout.pp * layout.virtual)
    chunks = stages_of(named_placement(layout.schedule, layout.pp, layout.virtual), rank)
    return sum(plan.stage_params(stages[s]) for s in chunks) / layout.tp


def optimizer_time(plan: PlanModel, machine, layout: Layout, rank: int) -> float:
    """The optimizer step of one GPU of pipeline rank `rank`: over 1/dp of its parameters
    under ZeRO-1, then the all-gather of the updated ones."""
    numel = rank_numel(plan, layout, rank)
    if not (layout.zero and layout.dp > 1):
        return machine.optimizer(numel, plan.half)
    intra = layout.tp * layout.pp * layout.dp <= machine.gpus_per_node
    gather = machine.allgather(layout.dp, numel * element_size(plan.dtype), intra)
    return machine.optimizer(numel / layout.dp, plan.half) + gather
