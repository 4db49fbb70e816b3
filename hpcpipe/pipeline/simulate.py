"""Cost-model simulator: replay a schedule with per-action durations and report its timeline.

Rules: each rank runs its compute actions in list order, one at a time; an action starts when
its rank is free and its dependency has ended (plus one comm hop if that dependency is on
another rank). F(s) waits for F(s-1); B(s) waits for B(s+1) (the last stage for its own F);
W(s) waits for B(s). SEND/RECV take no rank time. Times are in whatever unit Costs uses.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field

from hpcpipe.pipeline.schedule import (
    Action,
    Kind,
    Schedule,
    ScheduleError,
    build_schedule,
    stage_rank,
)


@dataclass(frozen=True)
class Costs:
    """Per-micro-batch times of one rank's whole model share, plus the per-hop comm model."""

    t_f: float = 1.0
    t_b: float = 1.0
    t_w: float = 0.0
    t_comm: float = 0.0
    # Optional alpha-beta comm model: used instead of t_comm when bandwidth > 0.
    latency: float = 0.0
    bandwidth: float = 0.0
    message_bytes: float = 0.0

    @classmethod
    def parse(cls, text: str) -> Costs:
        """Parse ``"T_F,T_B,T_W,T_comm"`` (trailing fields optional, default as above)."""
        parts = [p.strip() for p in str(text).split(",")]
        if not 1 <= len(parts) <= 4 or "" in parts:
            raise ValueError(f"cannot parse costs {text!r}: expected 'T_F,T_B,T_W,T_comm'")
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise ValueError(f"cannot parse costs {text!r}: fields must be numbers") from None
        if any(v < 0 or v != v for v in values):
            raise ValueError(f"cannot parse costs {text!r}: times must be >= 0")
        return cls(*values)

    def hop(self) -> float:
        """Time one activation/gradient message takes between neighbouring ranks."""
        if self.bandwidth > 0:
            return self.latency + self.message_bytes / self.bandwidth
        return self.t_comm


@dataclass
class Timed:
    """One compute action placed on the timeline."""

    rank: int
    action: Action
    start: float
    end: float


@dataclass
class SimResult:
    """Timeline and summary statistics of one simulated (or measured) training step."""

    timeline: list[Timed]
    step_time: float
    per_rank_span: dict[int, float]
    bubble_rate: float
    peak_activations: dict[int, int]
    idle: dict[int, float] = field(default_factory=dict)  # step_time - busy, per rank

    def to_json(self) -> dict:
        """JSON-ready dict of floats; per-rank values become lists indexed by rank."""
        ranks = range(max(self.per_rank_span, default=-1) + 1)
        return {
            "bubble_rate": float(self.bubble_rate),
            "step_time": float(self.step_time),
            "peak_activations": [self.peak_activations.get(r, 0) for r in ranks],
            "idle": [float(self.idle.get(r, 0)) for r in ranks],
            "per_rank_span": [float(self.per_rank_span.get(r, 0)) for r in ranks],
            "timeline": [
                {
                    "rank": t.rank,
                    "action": str(t.action),
                    "start": float(t.start),
                    "end": float(t.end),
                }
                for t in self.timeline
            ],
        }


def _timed_json(t: Timed) -> dict:
    """One timeline entry as plain JSON types."""
    return {"rank": t.rank, "action": str(t.action), "start": float(t.start), "end": float(t.end)}


# ---------------------------------------------------------------- simulation


def _durations(schedule: Schedule, V: int, costs: Costs) -> dict[Action, float]:
    """Per-chunk time of each compute action; a B with no W of its own also does W's work."""
    computes = [a for acts in schedule.values() for a in acts if a.is_compute]
    with_w = {(a.stage, a.microbatch) for a in computes if a.kind == Kind.W}
    base = {Kind.F: costs.t_f, Kind.B: costs.t_b, Kind.W: costs.t_w}
    dur = {a: base[a.kind] / V for a in computes}
    for a in computes:
        if a.kind == Kind.B and (a.stage, a.microbatch) not in with_w:
            dur[a] = (costs.t_b + costs.t_w) / V
    return dur


def _dependency(action: Action, num_stages: int) -> Action | None:
    """The one compute action `action` waits for (see module docstring)."""
    s, m = action.stage, action.microbatch
    if action.kind == Kind.F:
        return Action(s - 1, Kind.F, m) if s > 0 else None
    if action.kind == Kind.B:
        return Action(s + 1, Kind.B, m) if s < num_stages - 1 else Action(s, Kind.F, m)
    return Action(s, Kind.B, m)


def _ready_time(action: Action, rank: int, ends: dict, K: int, V: int, hop: float):
    """When `action`'s input is available on `rank`, or None if not produced yet."""
    dep = _dependency(action, K * V)
    if dep is None:
        return 0
    if dep not in ends:
        return None
    return ends[dep] + (hop if stage_rank(dep.stage, K) != rank else 0)


def _deadlock(queues: dict, pos: dict, K: int, V: int) -> ScheduleError:
    """Describe every rank that cannot make progress and what it waits for."""
    stuck = []
    for r, queue in sorted(queues.items()):
        if pos[r] < len(queue):
            a = queue[pos[r]]
            dep = _dependency(a, K * V)
            stuck.append(f"rank {r} action {a} waits for {dep} (rank {stage_rank(dep.stage, K)})")
    return ScheduleError("deadlock in simulation: " + "; ".join(stuck))


def _run(schedule: Schedule, K: int, V: int, costs: Costs) -> list[Timed]:
    """Place every compute action in time; sweep ranks until all are done or none can move."""
    dur, hop = _durations(schedule, V, costs), costs.hop()
    queues = {r: [a for a in schedule.get(r, []) if a.is_compute] for r in range(K)}
    pos, free = dict.fromkeys(queues, 0), dict.fromkeys(queues, 0)
    ends: dict[Action, float] = {}
    timeline: list[Timed] = []
    while any(pos[r] < len(q) for r, q in queues.items()):
        progressed = False
        for r, queue in queues.items():
            # A start time depends only on already-placed actions, so sweep order is irrelevant.
            while pos[r] < len(queue):
                a = queue[pos[r]]
                ready = _ready_time(a, r, ends, K, V, hop)
                if ready is None:
                    break
                start = max(free[r], ready)
                free[r] = ends[a] = start + dur[a]
                timeline.append(Timed(r, a, start, free[r]))
                pos[r] += 1
                progressed = True
        if not progressed:
            raise _deadlock(queues, pos, K, V)
    return sorted(timeline, key=lambda t: (t.start, t.rank))


def peak_activations(timeline: list[Timed], K: int) -> dict[int, int]:
    """Max live micro-batch activations per rank: held from F start to W end (else B end; a
    forward-only schedule's F frees its activations when it ends)."""
    starts, f_end, b_end, w_end, rank = {}, {}, {}, {}, {}
    for t in timeline:
        key = (t.action.stage, t.action.microbatch)
        rank[key] = t.rank
        if t.action.kind == Kind.F:
            starts[key], f_end[key] = t.start, t.end
        elif t.action.kind == Kind.B:
            b_end[key] = t.end
        else:
            w_end[key] = t.end
    events: dict[int, list] = {r: [] for r in range(K)}
    for key, start in starts.items():
        release = w_end.get(key, b_end.get(key, f_end[key]))
        events[rank[key]] += [(start, 1), (release, -1)]
    # Sorting (time, delta) frees before it allocates at equal times: intervals are half-open.
    return {r: _max_prefix(sorted(ev)) for r, ev in events.items()}


def _max_prefix(events: list[tuple[float, int]]) -> int:
    """Largest running sum of the deltas."""
    live = peak = 0
    for _, delta in events:
        live += delta
        peak = max(peak, live)
    return peak


def summarize(timeline: list[Timed], K: int, M: int, costs: Costs) -> SimResult:
    """Step time, spans, idle, bubble rate and peak activations of a timeline."""
    by_rank: dict[int, list[Timed]] = {r: [] for r in range(K)}
    for t in timeline:
        by_rank.setdefault(t.rank, []).append(t)
    span = {r: _span(ts) for r, ts in by_rank.items()}
    step = max((t.end for t in timeline), default=0) - min((t.start for t in timeline), default=0)
    # Idle counts against the whole step: waiting for the first input is bubble too.
    idle = {r: step - sum(t.end - t.start for t in ts) for r, ts in by_rank.items()}
    cost = max(span.values(), default=0)
    if timeline and all(t.action.kind == Kind.F for t in timeline):
        # NOTE: forward-only: nothing comes back to rank 0, so no span holds the fill and the
        # drain; the pass lasts the whole step.
        cost = step
    ideal = M * (costs.t_f + costs.t_b + costs.t_w)
    bubble = (cost - ideal) / cost if cost else 0.0
    return SimResult(timeline, step, span, bubble, peak_activations(timeline, K), idle)


def _span(timed: list[Timed]) -> float:
    """From a rank's first start to its last end (0 for an idle rank)."""
    if not timed:
        return 0
    return max(t.end for t in timed) - min(t.start for t in timed)


def simulate(schedule: Schedule, K: int, M: int, V: int = 1, costs: Costs = Costs()) -> SimResult:
    """Simulate one step of `schedule` under `costs`; raise ScheduleError on deadlock."""
    return summarize(_run(schedule, K, V, costs), K, M, costs)


def predict(name: str, K: int, M: int, V: int = 1, costs: Costs = Costs()) -> SimResult:
    """Build the named schedule and simulate it."""
    return simulate(build_schedule(name, K, M, V), K, M, V, costs)


# ---------------------------------------------------------------- fitting to measurements


def as_timeline(events: Iterable) -> list[Timed]:
    """Accept Timed objects or dicts {rank, action, start, end} (action str or Action)."""
    out = []
    for e in events:
        if isinstance(e, Timed):
            out.append(e)
            continue
        action = e["action"] if isinstance(e["action"], Action) else Action.parse(e["action"])
        out.append(Timed(int(e["rank"]), action, float(e["start"]), float(e["end"])))
    return out


def fit_costs(trace_events: Iterable, V: int = 1) -> Costs:
    """Fit Costs to measured actions: mean per-chunk F/B/W times x V, and a median comm hop.

    If the trace has no W actions, t_w is 0 and t_b includes the weight gradient, matching
    how simulate folds W into B for schedules without W.
    """
    timeline = as_timeline(trace_events)
    means = {}
    for kind in (Kind.F, Kind.B, Kind.W):
        durations = [t.end - t.start for t in timeline if t.action.kind == kind]
        means[kind] = statistics.fmean(durations) * V if durations else 0.0
    return Costs(means[Kind.F], means[Kind.B], means[Kind.W], _fit_comm(timeline))


def _fit_comm(timeline: list[Timed]) -> float:
    """Median F(s-1,m) end -> F(s,m) start gap across ranks, where the receiver sat waiting.

    A gap only measures comm when the receiving rank was idle: its previous action ended
    no later than the sender's F, so the rank had nothing to do but wait for the message.
    """
    fwd = {(t.action.stage, t.action.microbatch): t for t in timeline if t.action.kind == Kind.F}
    prev_end = _previous_ends(timeline)
    gaps = []
    for (s, m), recv in fwd.items():
        send = fwd.get((s - 1, m))
        if send is None or send.rank == recv.rank:
            continue
        if prev_end.get(id(recv), float("-inf")) <= send.end:
            gaps.append(max(0.0, recv.start - send.end))
    return statistics.median(gaps) if gaps else 0.0


def _previous_ends(timeline: list[Timed]) -> dict[int, float]:
    """id(timed) -> end of the same rank's previous action (absent for a rank's first)."""
    out: dict[int, float] = {}
    by_rank: dict[int, list[Timed]] = {}
    for t in timeline:
        by_rank.setdefault(t.rank, []).append(t)
    for ts in by_rank.values():
        ts.sort(key=lambda t: t.start)
        for before, after in zip(ts, ts[1:], strict=False):
            out[id(after)] = before.end
    return out
