"""Cost-model simulator: replay a schedule with per-action durations and report its timeline.

Rules: each rank runs its compute actions in list order, one at a time; an action starts when
its rank is free and its dependency has ended (plus one comm hop if that dependency is on
another rank). F(s) waits for F(s-1); B(s) waits for B(s+1) (the last stage for its own F);
W(s) waits for B(s). SEND/RECV take no rank time. Times are in whatever unit Costs uses.

simulate takes one Costs for every rank; simulate_stages takes a cost per stage, a hop per
stage boundary and, for MPI processes that share CPU cores, a speed curve: busy ranks then
progress at a rate set by how many are busy at once (an event-driven processor-sharing model).
Both place actions with a worklist, O(number of actions).
"""

from __future__ import annotations

import gc
import heapq
import numbers
import statistics
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from operator import attrgetter
from typing import NamedTuple

from hpcpipe.pipeline.schedule import (
    Action,
    Kind,
    Schedule,
    ScheduleError,
    build_schedule,
    stage_owners,
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

# A stage's (F, B, W) times of one micro-batch, indexed by global stage.
StageCosts = Sequence[tuple[float, float, float]]
# speed(n), or speed[n - 1]: how fast each busy process runs while n processes are busy.
Speed = Callable[[int], float] | Sequence[float]


class _Step(NamedTuple):
    """One compute action of a rank's queue with everything placing it needs."""

    action: Action
    key: int  # this action's slot in the run's `ends`
    dependency: int  # slot of the action it waits for; -1 for none
    delay: float  # message time from the dependency's rank; 0 when it is on this rank
    work: float  # duration at full speed


# Kinds by small integer: hashing a Kind is Python code, hashing a tuple of ints is not.
_F, _B, _W = 0, 1, 2
_KINDS = (Kind.F, Kind.B, Kind.W)
# A split backward's I is a backward for dependencies (the upstream stage waits for it); a B
# without a W of its micro-batch does the W's work too (_FUSED_B).
_CODE = {Kind.F: _F, Kind.B: _B, Kind.I: _B, Kind.W: _W}
# A stage's work table: (F, B followed by its own W, W, B that also does W's work).
_FUSED_B = 3


def _chunk_work(costs: Costs, schedule: Schedule, K: int, V: int) -> list[tuple]:
    """Every stage's work table under Costs: each of a rank's V chunks does 1/V of its work.

    Sized for every stage the schedule names: simulate never required stages < K*V.
    """
    per_chunk = (costs.t_f / V, costs.t_b / V, costs.t_w / V, (costs.t_b + costs.t_w) / V)
    named = max((a.stage + 1 for acts in schedule.values() for a in acts), default=0)
    return [per_chunk] * max(K * V, named)


def _stage_work(stage_costs: StageCosts) -> list[tuple]:
    """Every stage's work table from its (f, b, w)."""
    return [(f, b, w, b + w) for f, b, w in stage_costs]


def _boundary_hops(hop: float | Sequence[float], num_stages: int) -> list[float]:
    """Message time across each boundary s | s+1: one hop for all, or hop[s]."""
    if isinstance(hop, numbers.Real):  # a float, Fraction or NumPy scalar; else a sequence
        return [hop] * max(1, num_stages - 1)
    return list(hop)


def _dependency_key(stage: int, kind: int, m: int, num_stages: int) -> tuple | None:
    """(stage, kind, microbatch) of the one compute action an action waits for, or None.

    F(s) waits for F(s-1); B(s) for B(s+1), the last stage's for its own F; W(s) for B(s).
    """
    if kind == _F:
        return (stage - 1, _F, m) if stage > 0 else None
    if kind == _B:
        return (stage + 1, _B, m) if stage < num_stages - 1 else (stage, _F, m)
    return (stage, _B, m)


def _dependency(action: Action, num_stages: int) -> Action | None:
    """The one compute action `action` waits for (see module docstring)."""
    kind = _CODE[action.kind]
    key = _dependency_key(action.stage, kind, action.microbatch, num_stages)
    return None if key is None else Action(key[0], _KINDS[key[1]], key[2])


def _keyed_queues(schedule: Schedule, K: int) -> dict[int, list[tuple[Action, tuple]]]:
    """Each rank's compute actions in list order, each with its (stage, kind, microbatch)."""
    code = _CODE
    return {
        r: [(a, (a.stage, code[a.kind], a.microbatch)) for a in schedule.get(r, []) if a.is_compute]
        for r in range(K)
    }


def _steps(
    schedule: Schedule, K: int, V: int, work: list[tuple], hops: list[float]
) -> tuple[dict[int, list[_Step]], int]:
    """Each rank's compute actions in list order, with their dependency, delay and work; and
    how many slots the keys use (a dependency no rank runs gets a slot that never fills).

    work[s]: stage s's work table (see _FUSED_B); hops[s]: message time across s | s+1.
    """
    queues = _keyed_queues(schedule, K)
    slots: dict[tuple, int] = {}
    with_w: set[tuple[int, int]] = set()
    for queue in queues.values():
        for _, key in queue:
            slots.setdefault(key, len(slots))
            if key[1] == _W:
                with_w.add((key[0], key[2]))
    num_stages, last_hop = K * V, len(hops) - 1
    place = _placement(schedule, K, V)
    new_step = tuple.__new__  # NOTE: _Step(...) goes through a Python-level __new__: 2x slower
    steps: dict[int, list[_Step]] = {}
    for r, queue in queues.items():
        mine = steps[r] = []
        for a, key in queue:
            s, kind, m = key
            dep = _dependency_key(s, kind, m, num_stages)
            delay = 0
            if dep is not None and place[dep[0]] != r:
                # NOTE: min(..., last_hop): only a malformed placement sends within one stage.
                delay = hops[min(dep[0], s, last_hop)]
            dep_slot = -1 if dep is None else slots.setdefault(dep, len(slots))
            column = _FUSED_B if kind == _B and (s, m) not in with_w else kind
            mine.append(new_step(_Step, (a, slots[key], dep_slot, delay, work[s][column])))
    return steps, len(slots)


def _placement(schedule: Schedule, K: int, V: int) -> tuple[int, ...]:
    """Where each stage runs, as the schedule says (round robin for a stage it never names).

    NOTE: lenient, unlike schedule.placement_of: a hand-built timing case may run one stage on
    several ranks (independent forwards that share the cores); validation is not its job.
    """
    owners = stage_owners(schedule)
    return tuple(owners.get(s, s % K) for s in range(K * V))


def _deadlock(queues: dict, pos: dict, K: int, V: int) -> ScheduleError:
    """Describe every rank that cannot make progress and what it waits for."""
    place = _placement(queues, K, V)
    stuck = []
    for r, queue in sorted(queues.items()):
        if pos[r] < len(queue):
            a = queue[pos[r]]
            dep = _dependency(a, K * V)
            stuck.append(f"rank {r} action {a} waits for {dep} (rank {place[dep.stage]})")
    return ScheduleError("deadlock in simulation: " + "; ".join(stuck))


def _check_finished(steps: dict[int, list[_Step]], pos: dict[int, int], K: int, V: int) -> None:
    """Raise the deadlock error if some rank still has actions it never started."""
    if any(pos[r] < len(queue) for r, queue in steps.items()):
        queues = {r: [step.action for step in queue] for r, queue in steps.items()}
        raise _deadlock(queues, pos, K, V)


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector: a run allocates several objects per action and no
    cycles, and at 10^5 actions the collector's repeated scans of them take a third of the
    time (measured at K=64, M=512)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _by_start(timeline: list[Timed]) -> list[Timed]:
    """The timeline ordered by (start, rank); a rank's equal starts stay in list order."""
    return sorted(timeline, key=attrgetter("start", "rank"))


def _place_in_list_order(
    steps: dict[int, list[_Step]], num_slots: int, K: int, V: int
) -> tuple[list[Timed], int]:
    """Place every action at full speed; return the timeline and how many looks it took.

    A worklist instead of sweeps: a rank runs down its queue until an action's dependency has
    not been placed, parks on that dependency, and is woken when it is placed. Each action is
    looked at once when placed and at most once more when its rank parks on it, so the work
    is O(actions). A start depends only on already-placed actions, so the order in which ranks
    are run cannot change the timeline.
    """
    pos, free = dict.fromkeys(steps, 0), dict.fromkeys(steps, 0)
    ends: list[float | None] = [None] * num_slots
    parked: dict[int, list[int]] = {}
    timeline: list[Timed] = []
    looks = 0
    active = list(steps)
    while active:
        r = active.pop()
        queue, i, t = steps[r], pos[r], free[r]
        while i < len(queue):
            action, key, dep, delay, work = queue[i]
            looks += 1
            ready = 0
            if dep >= 0:
                if ends[dep] is None:
                    parked.setdefault(dep, []).append(r)
                    break
                ready = ends[dep] + delay
            start = ready if ready > t else t  # max(t, ready) without the call
            t = ends[key] = start + work
            timeline.append(Timed(r, action, start, t))
            i += 1
            if key in parked:
                active += parked.pop(key)
        pos[r], free[r] = i, t
    _check_finished(steps, pos, K, V)
    return _by_start(timeline), looks


def _run(schedule: Schedule, K: int, V: int, costs: Costs) -> list[Timed]:
    """Place every compute action in time (rules in the module docstring); raise on deadlock.

    Each rank runs its compute actions in list order, one at a time; an action starts when its
    rank is free and its dependency has ended, plus one hop if that dependency ran on another
    rank. A worklist replaces the repeated sweeps over all ranks (same timeline, O(actions)).
    """
    hops = _boundary_hops(costs.hop(), K * V)
    steps, num_slots = _steps(schedule, K, V, _chunk_work(costs, schedule, K, V), hops)
    return _place_in_list_order(steps, num_slots, K, V)[0]


def _rate_function(speed: Speed) -> Callable[[int], float]:
    """speed as a function of the number of busy processes (a list extrapolates 1/n)."""
    if callable(speed):
        return speed
    rates = list(speed)
    if not rates:
        raise ValueError("speed must name at least the rate of one busy process")
    # Beyond the list the cores are saturated: the last entry's total throughput, shared.
    return lambda n: rates[n - 1] if n <= len(rates) else rates[-1] * len(rates) / n


class _SharedClock:
    """Work each busy process has done since time 0; all busy processes share one rate.

    Re-anchored only when the rate changes, so under a constant rate of 1 the work clock is
    the wall clock without rounding: an action's end is exactly start + work, as at full speed.
    """

    def __init__(self) -> None:
        self.t0 = self.w0 = 0
        self.rate: float | None = None

    def work_at(self, t: float) -> float:
        return self.w0 + (t - self.t0) * self.rate

    def time_of(self, work: float) -> float:
        return self.t0 + (work - self.w0) / self.rate

    def set_rate(self, t: float, rate: float) -> None:
        if rate == self.rate:
            return
        if not rate > 0:
            raise ValueError(f"speed must be > 0 for every number of busy processes, got {rate}")
        if self.rate is not None:
            self.w0, self.t0 = self.work_at(t), t
        self.rate = rate


class _SharedRun:
    """Event-driven placement where busy ranks share the CPU (processor sharing).

    Same rules as _place_in_list_order, but an action's duration is its work divided by the
    rate of the moment, which changes whenever a rank starts or ends an action. Events are an
    action ending (the smallest work target: all busy ranks progress alike) or a message
    arriving; waiting ranks are not busy (hpcpipe's waits sleep).
    """

    def __init__(
        self,
        steps: dict[int, list[_Step]],
        num_slots: int,
        rate: Callable[[int], float],
        procs: int,
    ):
        self.steps, self.rate, self.procs = steps, rate, procs
        self.pos = dict.fromkeys(steps, 0)
        self.started: dict[int, float] = {}
        self.ends: list[float | None] = [None] * num_slots
        self.parked: dict[int, list[int]] = {}
        self.arrivals: list[tuple[float, int]] = []  # (time the input lands, rank)
        self.running: list[tuple[float, int]] = []  # (work clock at its end, rank)
        self.clock = _SharedClock()
        self.timeline: list[Timed] = []

    def run(self) -> list[Timed]:
        now, due = 0, list(self.steps)
        while True:
            self._start(now, due)
            if not self.running and not self.arrivals:
                return _by_start(self.timeline)
            now = self._next_event(now)
            due = self._finish_until(now) + self._arrive_until(now)

    def _start(self, now: float, due: list[int]) -> None:
        """Start what the due ranks can start now, then set the rate for what follows."""
        starting = [r for r in due if self._can_start(r, now)]
        busy = len(self.running) + len(starting)
        if busy:
            self.clock.set_rate(now, self.rate(self.procs * busy))
        work_now = self.clock.work_at(now) if starting else 0
        for r in starting:
            self.started[r] = now
            heapq.heappush(self.running, (work_now + self.steps[r][self.pos[r]].work, r))

    def _can_start(self, r: int, now: float) -> bool:
        """True if rank r's next action has its input now; else park it or await the message."""
        if self.pos[r] == len(self.steps[r]):
            return False
        _, _, dep, delay, _ = self.steps[r][self.pos[r]]
        if dep < 0:
            return True
        if self.ends[dep] is None:
            self.parked.setdefault(dep, []).append(r)
            return False
        ready = self.ends[dep] + delay
        if ready > now:
            heapq.heappush(self.arrivals, (ready, r))
            return False
        return True

    def _next_event(self, now: float) -> float:
        """The earlier of the next end (at the current rate) and the next message arrival."""
        times = []
        if self.arrivals:
            times.append(self.arrivals[0][0])
        if self.running:
            # max(): rounding must never move time backwards.
            times.append(max(now, self.clock.time_of(self.running[0][0])))
        return min(times)

    def _finish_until(self, now: float) -> list[int]:
        """End every action due by `now`; return its rank and the ranks parked on it."""
        due = []
        while self.running and self.clock.time_of(self.running[0][0]) <= now:
            _, r = heapq.heappop(self.running)
            step = self.steps[r][self.pos[r]]
            self.ends[step.key] = now
            self.timeline.append(Timed(r, step.action, self.started.pop(r), now))
            self.pos[r] += 1
            due += [r, *self.parked.pop(step.key, ())]
        return due

    def _arrive_until(self, now: float) -> list[int]:
        """Ranks whose awaited message has landed by `now`."""
        due = []
        while self.arrivals and self.arrivals[0][0] <= now:
            due.append(heapq.heappop(self.arrivals)[1])
        return due


def _place_sharing_cores(
    steps: dict[int, list[_Step]],
    num_slots: int,
    K: int,
    V: int,
    rate: Callable[[int], float],
    procs_per_rank: int,
) -> list[Timed]:
    """Place every action with busy ranks sharing the cores (see _SharedRun)."""
    run = _SharedRun(steps, num_slots, rate, procs_per_rank)
    timeline = run.run()
    _check_finished(steps, run.pos, K, V)
    return timeline


def peak_activations(timeline: list[Timed], K: int) -> dict[int, int]:
    """Max live micro-batch activations per rank: held from F start to W end (else B end; a
    forward-only schedule's F frees its activations when it ends)."""
    F, B, I = Kind.F, Kind.B, Kind.I  # noqa: E741 (locals: an Enum lookup is slow, per action)
    # (stage, microbatch) -> [rank of its last action, F start, F end, B end, W end]
    held: dict[tuple[int, int], list] = {}
    for t in timeline:
        a = t.action
        h = held.get((a.stage, a.microbatch))
        if h is None:
            h = held[a.stage, a.microbatch] = [t.rank, None, None, None, None]
        h[0] = t.rank
        if a.kind is F:
            h[1], h[2] = t.start, t.end
        elif a.kind is B or a.kind is I:
            h[3] = t.end
        else:
            h[4] = t.end
    starts: dict[int, list] = {r: [] for r in range(K)}
    releases: dict[int, list] = {r: [] for r in range(K)}
    for rank, start, f_end, b_end, w_end in held.values():
        if start is not None:
            starts.setdefault(rank, []).append(start)
            release = w_end if w_end is not None else b_end if b_end is not None else f_end
            releases.setdefault(rank, []).append(release)
    return {r: _most_alive(starts[r], releases[r]) for r in starts}


def _most_alive(starts: list[float], releases: list[float]) -> int:
    """Most intervals alive at once; half-open, so a release frees before an equal start.

    Right after the k-th start (sorted) k + 1 have started and every release at or before it
    has freed; the maximum is at some start.
    """
    starts.sort()
    releases.sort()
    alive = (k + 1 - bisect_right(releases, s) for k, s in enumerate(starts))
    return max(0, max(alive, default=0))


def summarize(timeline: list[Timed], K: int, M: int, costs: Costs) -> SimResult:
    """Step time, spans, idle, bubble rate and peak activations of a timeline."""
    return _summary(timeline, K, M * (costs.t_f + costs.t_b + costs.t_w))


def _summary(timeline: list[Timed], K: int, ideal: float, peaks: bool = True) -> SimResult:
    """SimResult of a timeline whose bubble-free span would be `ideal` (peaks=False: without
    peak_activations, which the planner does not need and which costs a pass)."""
    busy, first, last = _busy_first_last(timeline, K)
    span = {r: last[r] - first[r] if r in first else 0 for r in busy}
    step = max(last.values(), default=0) - min(first.values(), default=0)
    # Idle counts against the whole step: waiting for the first input is bubble too.
    idle = {r: step - busy[r] for r in busy}
    cost = max(span.values(), default=0)
    if timeline and all(t.action.kind == Kind.F for t in timeline):
        # NOTE: forward-only: nothing comes back to rank 0, so no span holds the fill and the
        # drain; the pass lasts the whole step.
        cost = step
    bubble = (cost - ideal) / cost if cost else 0.0
    held = peak_activations(timeline, K) if peaks else {}
    return SimResult(timeline, step, span, bubble, held, idle)


def _busy_first_last(timeline: list[Timed], K: int) -> tuple[dict, dict, dict]:
    """Per rank: summed durations (in timeline order), earliest start, latest end.

    One pass, as the planner summarizes 10^5-action timelines; ranks 0..K-1 come first, then
    any other rank in the order it appears.
    """
    busy: dict[int, float] = dict.fromkeys(range(K), 0)
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    for t in timeline:
        r, start, end = t.rank, t.start, t.end
        if r in first:
            first[r] = min(first[r], start)
            last[r] = max(last[r], end)
        else:
            first[r], last[r] = start, end
            busy.setdefault(r, 0)
        busy[r] += end - start
    return busy, first, last


def simulate(schedule: Schedule, K: int, M: int, V: int = 1, costs: Costs = Costs()) -> SimResult:
    """Simulate one step of `schedule` under `costs`; raise ScheduleError on deadlock."""
    with _collector_paused():
        return summarize(_run(schedule, K, V, costs), K, M, costs)


def predict(name: str, K: int, M: int, V: int = 1, costs: Costs = Costs()) -> SimResult:
    """Build the named schedule and simulate it."""
    return simulate(build_schedule(name, K, M, V), K, M, V, costs)


def simulate_stages(
    schedule: Schedule,
    K: int,
    M: int,
    V: int,
    stage_costs: StageCosts,
    hop: float | Sequence[float],
    *,
    speed: Speed | None = None,
    procs_per_rank: int = 1,
    peaks: bool = True,
) -> SimResult:
    """Simulate one step with a cost per stage, per-boundary hops and optional CPU sharing.

    stage_costs[s] = (f, b, w): one micro-batch through global stage s (on rank s % K); a B
    without a W of its own also does the W's work. hop: seconds per message between ranks, or
    hop[s] for the boundary between stages s and s+1 (both directions); none within a rank.

    speed=None: the rules of simulate. Otherwise the ranks share CPU cores: while n processes
    compute, each progresses at speed(n) (or speed[n - 1]; beyond the list, the last entry's
    throughput shared: speed[-1] * len / n) times its solo rate, where each busy rank counts
    procs_per_rank processes (its tensor-parallel group times the data-parallel replicas
    running the same timeline; unused without speed). Waiting ranks use no CPU. An action's
    time on the timeline is then its work stretched by sharing, and idle is the rest.

    bubble_rate = (max span - W) / max span, W the busiest rank's total work at speed 1 (the
    step cannot be shorter). The lighter ranks' extra idle is imbalance, not bubble (their
    idle shows it); time lost to sharing cores is bubble. With equal stages this is
    simulate's bubble. M is only checked (>= 1): the schedule lists what runs.
    """
    _check_stage_inputs(K, M, V, stage_costs, hop, procs_per_rank)
    with _collector_paused():
        hops = _boundary_hops(hop, K * V)
        steps, num_slots = _steps(schedule, K, V, _stage_work(stage_costs), hops)
        if speed is None:
            timeline = _place_in_list_order(steps, num_slots, K, V)[0]
        else:
            rate = _rate_function(speed)
            timeline = _place_sharing_cores(steps, num_slots, K, V, rate, procs_per_rank)
        busiest = max(sum(step.work for step in queue) for queue in steps.values())
        return _summary(timeline, K, busiest, peaks)


def _check_stage_inputs(
    K: int,
    M: int,
    V: int,
    stage_costs: StageCosts,
    hop: float | Sequence[float],
    procs_per_rank: int,
) -> None:
    """Refuse sizes that do not describe K*V stages, with the sizes in the message."""
    if min(K, M, V, procs_per_rank) < 1:
        raise ValueError(
            f"K, M, V and procs_per_rank must be >= 1, got {K}, {M}, {V}, {procs_per_rank}"
        )
    if len(stage_costs) != K * V:
        raise ValueError(f"need K*V = {K * V} stage costs (f, b, w), got {len(stage_costs)}")
    if not isinstance(hop, numbers.Real) and len(hop) != K * V - 1:
        raise ValueError(f"need K*V-1 = {K * V - 1} boundary hops, got {len(hop)}")


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

    t_b is the mean of the backwards (B, or a split backward's I). If the trace has no W
    actions, t_w is 0 and t_b includes the weight gradient, matching how simulate folds W into
    B for schedules without W.
    """
    timeline = as_timeline(trace_events)
    means = {}
    for kind, kinds in ((Kind.F, (Kind.F,)), (Kind.B, (Kind.B, Kind.I)), (Kind.W, (Kind.W,))):
        durations = [t.end - t.start for t in timeline if t.action.kind in kinds]
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
