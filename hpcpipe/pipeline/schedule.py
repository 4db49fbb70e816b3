"""Pipeline schedules as data: generators, a comm-lowering pass, a validator and a renderer.

A schedule maps each rank to its ordered list of actions. Action strings follow
torch.distributed.pipelining exactly (``1F0``, ``0I3``, ``0SEND_F2``) so schedules can be
exchanged as CSV: F forward, B full backward, I the input-gradient half of a split backward
and W its weight-gradient half.
Vocabulary: K ranks, V chunks per rank (K*V global stages), M micro-batches. Where each stage
lives is read from the schedule itself (`placement_of`: the rank whose compute actions name it):
round robin (stage s on rank s % K) for every schedule but the V-shape ones (zb-v: rank r holds
stages r and 2K-1-r, torch's style="v").
"""

from __future__ import annotations

import csv
import enum
import io
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path


class ScheduleError(ValueError):
    """A schedule is malformed, inconsistent or would deadlock."""


# str mixin (not StrEnum) keeps Python 3.10 support, per ruff.toml's target-version.
class Kind(str, enum.Enum):  # noqa: UP042
    """Action kinds: compute (F, B, I, W) and point-to-point communication.

    As torch's _ComputationType: B is a full backward (input and weight gradients); a split
    backward is I (input gradient, what the upstream stage waits for) and later W.
    """

    F = "F"
    B = "B"
    I = "I"  # noqa: E741 (torch's letter)
    W = "W"
    SEND_F = "SEND_F"
    RECV_F = "RECV_F"
    SEND_B = "SEND_B"
    RECV_B = "RECV_B"

    # NOTE: Enum's own __hash__ is Python code; validation hashes actions millions of times.
    __hash__ = str.__hash__


COMPUTE_KINDS = frozenset({Kind.F, Kind.B, Kind.I, Kind.W})
# The actions that send a gradient upstream: a full backward or a split one's first half.
BACKWARD_KINDS = frozenset({Kind.B, Kind.I})
# fullmatch plus the digit groups make alternative order irrelevant (F vs SEND_F).
_ACTION_RE = re.compile(r"(\d+)(SEND_F|RECV_F|SEND_B|RECV_B|F|B|I|W)(\d+)")


@dataclass(frozen=True)
class Action:
    """One step of one rank: compute or communication for (stage, microbatch)."""

    stage: int
    kind: Kind
    microbatch: int

    def __str__(self) -> str:
        return f"{self.stage}{self.kind.value}{self.microbatch}"

    @classmethod
    def parse(cls, text: str) -> Action:
        """Parse torch-style notation such as ``1F0`` or ``0SEND_B3``."""
        match = _ACTION_RE.fullmatch(text.strip()) if isinstance(text, str) else None
        if match is None:
            valid = ", ".join(k.value for k in Kind)
            raise ValueError(
                f"cannot parse action {text!r}: expected <stage><kind><microbatch> "
                f"with kind in {{{valid}}}, e.g. '1F0' or '0SEND_F2'"
            )
        stage, kind, mb = match.groups()
        return cls(int(stage), Kind(kind), int(mb))

    @property
    def is_compute(self) -> bool:
        """True for F, B, I and W; False for communication."""
        return self.kind in COMPUTE_KINDS


Schedule = dict[int, list[Action]]


def stage_rank(stage: int, K: int) -> int:
    """Rank hosting a global stage under round-robin placement (stage s on rank s % K)."""
    return stage % K


# placement[s] = the pipeline rank that holds global stage s
Placement = tuple[int, ...]


def loop_placement(K: int, V: int = 1) -> Placement:
    """Round robin, torch's style="loop": stage s on rank s % K."""
    return tuple(s % K for s in range(K * V))


def v_placement(K: int) -> Placement:
    """V-shape, torch's style="v": rank r holds stages r and 2K - 1 - r, so the first and the
    last stage (embedding and head) share rank 0 and the turn at stage K - 1 -> K is local."""
    return tuple(s if s < K else 2 * K - 1 - s for s in range(2 * K))


# the schedules that place stages in the V shape (every other one places them round robin)
V_SHAPE = frozenset({"zb-v"})


def named_placement(name: str, K: int, V: int = 1) -> Placement:
    """The placement a named schedule uses (what placement_of of its schedule returns)."""
    return v_placement(K) if name in V_SHAPE else loop_placement(K, V)


def stage_owners(schedule: Schedule) -> dict[int, int]:
    """{stage: the rank running most of its compute actions} (the first such rank on a tie)."""
    counts: dict[int, Counter] = {}
    for rank, actions in schedule.items():
        for a in actions:
            if a.is_compute:
                counts.setdefault(a.stage, Counter())[rank] += 1
    return {s: c.most_common(1)[0][0] for s, c in counts.items()}


def misplaced(schedule: Schedule, owners: dict[int, int]) -> tuple[int, Action] | None:
    """The first (rank, compute action) of a stage that lives on another rank, if any."""
    for rank, actions in schedule.items():
        for a in actions:
            if a.is_compute and owners[a.stage] != rank:
                return rank, a
    return None


def placement_of(schedule: Schedule, K: int, V: int = 1) -> Placement:
    """Where the schedule's compute actions run each stage (ScheduleError if on two ranks);
    a stage no compute action names is placed round robin (the validator reports it missing)."""
    owners = stage_owners(schedule)
    stray = misplaced(schedule, owners)
    if stray is not None:
        rank, a = stray
        raise ScheduleError(
            f"rank {rank}, action {a}: stage {a.stage} lives on rank {owners[a.stage]}, not "
            f"rank {rank} (each stage runs on one rank)"
        )
    return tuple(owners.get(s, s % K) for s in range(K * V))


def stages_of(placement: Placement, rank: int) -> list[int]:
    """The global stages one rank holds, in pipeline order."""
    return [s for s, r in enumerate(placement) if r == rank]


# ---------------------------------------------------------------- generators


def _check_sizes(K: int, M: int, V: int = 1) -> None:
    """Reject non-positive pipeline dimensions with a clear message."""
    for name, value in (("K (ranks)", K), ("M (micro-batches)", M), ("V (chunks)", V)):
        if not isinstance(value, int) or value < 1:
            raise ScheduleError(f"{name} must be an integer >= 1, got {value!r}")


def compute_gpipe(K: int, M: int, V: int = 1) -> Schedule:
    """GPipe: every rank runs all forwards, then all backwards (in microbatch order)."""
    _check_sizes(K, M, V)
    schedule: Schedule = {}
    for rank in range(K):
        stages = [rank + c * K for c in range(V)]
        # Backwards walk chunks in reverse because gradients flow from the last stage.
        fwd = [Action(s, Kind.F, m) for s in stages for m in range(M)]
        bwd = [Action(s, Kind.B, m) for s in reversed(stages) for m in range(M)]
        schedule[rank] = fwd + bwd
    return schedule


def compute_1f1b(K: int, M: int, V: int = 1) -> Schedule:
    """PipeDream-Flush 1F1B: warm-up forwards, steady F/B pairs, cool-down backwards."""
    _check_sizes(K, M, V)
    if V != 1:
        raise ScheduleError(f"1f1b supports only V=1 (one chunk per rank), got V={V}")
    schedule: Schedule = {}
    for rank in range(K):
        warmup = min(K - 1 - rank, M)
        actions = [Action(rank, Kind.F, m) for m in range(warmup)]
        for i in range(M - warmup):
            actions += [Action(rank, Kind.F, warmup + i), Action(rank, Kind.B, i)]
        actions += [Action(rank, Kind.B, m) for m in range(M - warmup, M)]
        schedule[rank] = actions
    return schedule


def interleaved_round(K: int, M: int) -> int:
    """Micro-batches per round of the interleaved schedule (Megatron's group of K, relaxed).

    Megatron needs M % K == 0. Like torch's flexible variant, hpcpipe runs max(1, M // K)
    rounds of equal size, so it accepts every M that those rounds divide (all M <= K included).
    """
    rounds = max(1, M // K)
    if M % rounds:
        valid = [m for m in range(max(1, M - K), M + K + 1) if m % max(1, m // K) == 0]
        below = max(m for m in valid if m < M)
        above = min(m for m in valid if m > M)
        raise ScheduleError(
            f"interleaved schedule with K={K} ranks cannot split M={M} micro-batches into "
            f"{rounds} equal rounds of about K; use M={below} or M={above} (any M <= K or a "
            f"multiple of M // K works)"
        )
    return M // rounds


def _interleaved_slot(k: int, R: int, V: int, backward: bool) -> tuple[int, int]:
    """(chunk, microbatch) of the k-th forward (or backward) of one rank."""
    chunk = (k // R) % V
    microbatch = (k // (R * V)) * R + k % R
    return (V - 1 - chunk if backward else chunk), microbatch


def compute_interleaved(K: int, M: int, V: int = 2) -> Schedule:
    """Interleaved 1F1B (Megatron placement: rank r holds stages r, r+K, ...; depth first)."""
    _check_sizes(K, M, V)
    R = interleaved_round(K, M)
    total = M * V
    schedule: Schedule = {}
    for rank in range(K):
        # Warm-up fills the later chunks' pipeline: (V-1) rounds, plus 2 per downstream rank.
        warmup = min((V - 1) * R + 2 * (K - 1 - rank), total)

        def fwd(k: int, rank: int = rank) -> Action:
            chunk, m = _interleaved_slot(k, R, V, backward=False)
            return Action(chunk * K + rank, Kind.F, m)

        def bwd(k: int, rank: int = rank) -> Action:
            chunk, m = _interleaved_slot(k, R, V, backward=True)
            return Action(chunk * K + rank, Kind.B, m)

        actions = [fwd(k) for k in range(warmup)]
        for k in range(warmup, total):
            actions += [fwd(k), bwd(k - warmup)]
        actions += [bwd(k) for k in range(total - warmup, total)]
        schedule[rank] = actions
    return schedule


def compute_zb_h1(K: int, M: int, V: int = 1) -> Schedule:
    """ZB-H1 (Qi et al., 2023): backward split into I (input grad) and W (weight grad).

    Rank r runs K - r warm-up forwards, then I_m, W_{m-r}, F_{m+K-r} per micro-batch: deferring
    r weight-gradient passes lets the I chain run ahead, and the W's fill the cool-down. With
    T_F = T_B = T_W and M >= K the idle time is (K-1)(T_F+T_B-T_W), a third of 1F1B's, and no
    rank holds more micro-batches than 1F1B's first rank (K).
    """
    _check_sizes(K, M, V)
    if V != 1:
        raise ScheduleError(f"zb-h1 supports only V=1 (one chunk per rank), got V={V}")
    schedule: Schedule = {}
    for rank in range(K):
        warmup, defer = min(K - rank, M), rank
        actions = [Action(rank, Kind.F, m) for m in range(warmup)]
        for m in range(M):
            actions.append(Action(rank, Kind.I, m))
            if m >= defer:
                actions.append(Action(rank, Kind.W, m - defer))
            if m + warmup < M:
                actions.append(Action(rank, Kind.F, m + warmup))
        actions += [Action(rank, Kind.W, m) for m in range(max(0, M - defer), M)]
        schedule[rank] = actions
    return schedule


def compute_zb_h2(K: int, M: int, V: int = 1) -> Schedule:
    """ZB-H2 (Qi et al., 2023): ZB-H1 with about twice 1F1B's memory and no bubble left but
    the pipeline's fill and drain.

    Rank r holds up to 2K - 1 micro-batches, so its warm-up runs forwards until the first
    gradient can be back (2(K - r) - 1 of them at equal costs) and the W's deferred to the
    end fill the drain: the order list scheduling gives at T_F = T_B = T_W (greedy.py). With
    M >= 2K its bubble is (K - 1)(T_F + T_B + 2 T_comm - 2 T_W) of a rank's time where that is
    >= 0 (tests/test_zero_bubble_schedules.py).
    """
    from hpcpipe.pipeline.greedy import list_schedule  # NOTE: greedy is pure; no cycle at import

    _check_sizes(K, M, V)
    if V != 1:
        raise ScheduleError(f"zb-h2 supports only V=1 (one chunk per rank), got V={V}")
    order = list_schedule(K, M, (1.0, 1.0, 1.0, 0.0), limit=2 * K - 1)
    return {r: [Action(r, Kind(kind), m) for kind, m in actions] for r, actions in order.items()}


def compute_zb_v(K: int, M: int, V: int = 2) -> Schedule:
    """ZB-V (Qi et al., 2024, "Pipeline Parallelism with Controllable Memory"; the Zero Bubble
    paper's section 6): two chunks per rank in the V shape (rank r holds stages r and 2K-1-r),
    backward split into I and W, the compute order of torch's ScheduleZBVZeroBubble.

    Rank r warms up with 2(K - r) - 1 forwards of its first chunk, then pairs of both chunks'
    forwards, then runs F, I, W of each chunk in turn; the W's fill the drain. A rank holds at
    most 2K chunk activations (each half a stage of 1F1B's): 1F1B's peak memory. At
    T_F = T_B = T_W and M >= 2K - 1 its bubble is the fill and drain only.
    """
    _check_sizes(K, M, V)
    if V != 2:
        raise ScheduleError(f"zb-v needs V=2 (two chunks per rank, the V shape), got V={V}")
    return {rank: _zb_v_rank(K, M, rank) for rank in range(K)}


def _zb_v_rank(K: int, M: int, rank: int) -> list[Action]:
    """One rank's ZB-V order, as torch's _calculate_single_rank_operations builds it: for
    max(2K - 1, M) micro-batches, those >= M dropped."""
    n_micro = max(2 * K - 1, M)
    first, second = rank, 2 * K - 1 - rank
    out: list[Action] = []
    count = {(c, k): 0 for c in (first, second) for k in (Kind.F, Kind.I, Kind.W)}

    def emit(stage: int, kind: Kind) -> None:
        out.append(Action(stage, kind, count[stage, kind]))
        count[stage, kind] += 1

    for _ in range(2 * (K - rank) - 1):
        emit(first, Kind.F)
    for _ in range(rank):
        emit(second, Kind.F)
        emit(first, Kind.F)
    for _ in range(K - rank):
        for kind in (Kind.F, Kind.I, Kind.W):
            emit(second, kind)
    while count[second, Kind.F] < count[first, Kind.F] or count[first, Kind.F] < n_micro:
        if count[first, Kind.F] < n_micro:
            emit(first, Kind.F)
        emit(first, Kind.I)
        emit(first, Kind.W)
        for kind in (Kind.F, Kind.I, Kind.W):
            emit(second, kind)
    for _ in range(rank):
        emit(first, Kind.I)
        emit(second, Kind.I)
    for _ in range(K - rank):
        emit(first, Kind.I)
        emit(first, Kind.W)
    for stage in (second, first):
        while count[stage, Kind.W] < count[stage, Kind.I]:
            emit(stage, Kind.W)
    return [a for a in out if a.microbatch < M]


def compute_interleaved_zb(K: int, M: int, V: int = 2) -> Schedule:
    """Interleaved 1F1B with the backward split and W deferred (ZB-H1's idea on V chunks, as
    torch's ScheduleInterleavedZeroBubble).

    Interleaved 1F1B's rank r finishes its backwards about 2r chunk-actions before rank 0 (its
    warm-up is 2 shorter per downstream rank). Here rank r runs each W 2r backwards after its
    I, so its I's reach the upstream ranks that much sooner and its last 2r W's fill the time it
    would have idled at the end: with T_F = T_B = T_W and K <= 4 only the pipeline's fill is
    left. With fewer than 2K micro-batches the cool-down is too short for 2r W's and r is
    better (torch's lag). Simulated over K <= 6, V <= 4, M <= 24 at equal and unequal costs,
    this is never slower than torch's own order, which buys memory instead: its shorter
    warm-up holds at most V*K chunks of activations per rank, where here (activations live
    until W) every rank may hold as many as interleaved 1F1B's first rank, (V-1)R + 2K - 1.
    """
    schedule = compute_interleaved(K, M, V)
    per_rank = 2 if M >= 2 * K else 1
    return {r: _defer_weight_grads(actions, per_rank * r) for r, actions in schedule.items()}


def _defer_weight_grads(actions: list[Action], lag: int) -> list[Action]:
    """Split every B into I and W, each W placed `lag` I's later (the last ones at the end)."""
    out: list[Action] = []
    backwards: list[Action] = []
    for action in actions:
        if action.kind != Kind.B:
            out.append(action)
        else:
            out.append(Action(action.stage, Kind.I, action.microbatch))
            backwards.append(action)
            if len(backwards) > lag:
                done = backwards[len(backwards) - 1 - lag]
                out.append(Action(done.stage, Kind.W, done.microbatch))
    tail = backwards[max(0, len(backwards) - lag) :]
    return out + [Action(b.stage, Kind.W, b.microbatch) for b in tail]


def compute_zb_auto(K: int, M: int, V: int = 1) -> Schedule:
    """zb-auto at T_F = T_B = T_W, no comm time, 1F1B's memory (build_schedule takes costs and
    a memory limit): see hpcpipe.pipeline.autoschedule."""
    from hpcpipe.pipeline.autoschedule import auto_schedule  # NOTE: it imports this module
    from hpcpipe.pipeline.simulate import Costs

    _check_sizes(K, M, V)
    if V != 1:
        raise ScheduleError(f"zb-auto supports only V=1 (one chunk per rank), got V={V}")
    return auto_schedule(K, M, Costs(1.0, 1.0, 1.0, 0.0))


SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "gpipe": compute_gpipe,
    "1f1b": compute_1f1b,
    "interleaved": compute_interleaved,
    "zb-h1": compute_zb_h1,
    "zb-h2": compute_zb_h2,
    "interleaved-zb": compute_interleaved_zb,
    "zb-v": compute_zb_v,
    "zb-auto": compute_zb_auto,
}
# Asynchronous schedules: no flush, a step also runs the next batch's first forwards and
# the weights keep two versions (hpcpipe.pipeline.twobw). Not in SCHEDULES: a step of theirs
# is no complete schedule of M micro-batches, so what holds for every flushing one does not.
ASYNC_SCHEDULES = ("2bw",)
# Every valid schedule.name for training.
TRAINING_SCHEDULES = (*SCHEDULES, *ASYNC_SCHEDULES)
# Schedules whose backward is split into I (input gradient) and W (weight gradient).
SPLIT_BACKWARD = frozenset({"zb-h1", "zb-h2", "interleaved-zb", "zb-v", "zb-auto"})


def compute_forward_only(K: int, M: int, V: int = 1, place: Placement | None = None) -> Schedule:
    """Evaluation (Megatron's forward_only, DeepSpeed's eval_batch): every F, no backward.

    Each rank runs its forwards in the order of the global key (m // K, stage, m % K): groups
    of K micro-batches, depth first over the rank's V chunks as interleaved 1F1B does. Every
    dependency F(s-1, m) -> F(s, m) has a smaller key, so any M and V are deadlock free, and a
    rank's output leaves right after it is made (its SEND_F follows): one micro-batch held.
    The same holds for any placement (default round robin): the key orders stages globally.
    """
    _check_sizes(K, M, V)
    place = place or loop_placement(K, V)
    schedule: Schedule = {}
    for rank in range(K):
        forwards = [(m // K, s, m % K) for s in stages_of(place, rank) for m in range(M)]
        schedule[rank] = [Action(s, Kind.F, g * K + i) for g, s, i in sorted(forwards)]
    return schedule


FORWARD_ONLY = "forward-only"
# Schedules without backward: what evaluation runs, never a training schedule.
FORWARD_SCHEDULES: dict[str, Callable[..., Schedule]] = {FORWARD_ONLY: compute_forward_only}


# ---------------------------------------------------------------- lowering


def _recv_for(action: Action, rank: int, place: Placement) -> Action | None:
    """Receive a compute action needs from a remote neighbour, if any."""
    s, m = action.stage, action.microbatch
    if action.kind == Kind.F and s > 0 and place[s - 1] != rank:
        return Action(s, Kind.RECV_F, m)
    if action.kind in BACKWARD_KINDS and s < len(place) - 1 and place[s + 1] != rank:
        return Action(s, Kind.RECV_B, m)
    return None


def _send_for(action: Action, rank: int, place: Placement) -> Action | None:
    """Send a compute action's output needs to a remote neighbour, if any."""
    s, m = action.stage, action.microbatch
    if action.kind == Kind.F and s < len(place) - 1 and place[s + 1] != rank:
        return Action(s, Kind.SEND_F, m)
    if action.kind in BACKWARD_KINDS and s > 0 and place[s - 1] != rank:
        return Action(s, Kind.SEND_B, m)
    return None


def _lower_rank(compute: list[Action], rank: int, place: Placement) -> list[Action]:
    """Insert comm for one rank: RECV one compute early, SEND right after producing."""
    # recvs[j + 1] is posted before compute j so the transfer overlaps with it.
    recvs = [_recv_for(a, rank, place) for a in compute] + [None]
    out: list[Action] = [recvs[0]] if recvs[0] else []
    for j, action in enumerate(compute):
        if recvs[j + 1]:
            out.append(recvs[j + 1])
        out.append(action)
        send = _send_for(action, rank, place)
        if send:
            out.append(send)
    return out


# local order: the kind each action must come after (None: the backward of its micro-batch) ...
_MUST_FOLLOW = {
    Kind.B: Kind.F,
    Kind.I: Kind.F,
    Kind.W: Kind.I,
    Kind.SEND_F: Kind.F,
    Kind.SEND_B: None,
}
# ... and the kind a receive must come before (its consumer)
_MUST_PRECEDE = {Kind.RECV_F: Kind.F, Kind.RECV_B: None}


def add_send_recv(compute: Schedule, K: int, V: int = 1) -> Schedule:
    """Lower a compute-only schedule by adding SEND/RECV actions between ranks (each stage
    where the schedule runs it: placement_of)."""
    place = placement_of(compute, K, V)
    return {
        rank: _lower_rank([a for a in actions if a.is_compute], rank, place)
        for rank, actions in compute.items()
    }


def build_schedule(
    name: str, K: int, M: int, V: int = 1, *, costs=None, memory_limit: float = 1.0
) -> Schedule:
    """Generate a named schedule, lower it with comm actions, and validate it.

    name is a training schedule (SCHEDULES), "forward-only" (FORWARD_SCHEDULES: evaluation)
    or "2bw" (ASYNC_SCHEDULES: its steady step, whose forwards >= M are the next batch's).
    zb-auto reads costs (a simulate.Costs; default T_F = T_B = T_W, no comm) and memory_limit
    (micro-batches held per rank as a multiple of 1F1B's peak); the others ignore both.
    """
    if name in ASYNC_SCHEDULES:
        from hpcpipe.pipeline import twobw  # NOTE: it imports this module

        return twobw.build(K, M, V)
    generate = SCHEDULES.get(name) or FORWARD_SCHEDULES.get(name)
    if generate is None:
        valid = ", ".join([*TRAINING_SCHEDULES, *FORWARD_SCHEDULES])
        raise ScheduleError(f"unknown schedule {name!r}; valid names: {valid}")
    _check_sizes(K, M, V)
    if name == "zb-auto" and (costs is not None or memory_limit != 1.0):
        from hpcpipe.pipeline.autoschedule import auto_schedule
        from hpcpipe.pipeline.simulate import Costs

        if V != 1:
            raise ScheduleError(f"zb-auto supports only V=1 (one chunk per rank), got V={V}")
        compute = auto_schedule(K, M, costs or Costs(1.0, 1.0, 1.0, 0.0), memory_limit)
    else:
        compute = generate(K, M, V)
    schedule = add_send_recv(compute, K, V)
    validate(schedule, K, M, V, forward_only=name in FORWARD_SCHEDULES)
    return schedule


def forward_only_schedule(K: int, M: int, V: int = 1, place: Placement | None = None) -> Schedule:
    """The validated forward-only schedule (F with its SEND_F/RECV_F) of K ranks, M, V, its
    stages where `place` puts them (a training schedule's placement_of; default round robin)."""
    if place is None or place == loop_placement(K, V):
        return build_schedule(FORWARD_ONLY, K, M, V)
    schedule = add_send_recv(compute_forward_only(K, M, V, place), K, V)
    validate(schedule, K, M, V, forward_only=True)
    return schedule


# ---------------------------------------------------------------- simulation


@dataclass
class ValidationReport:
    """What validate learned: per-rank peak activations and the unit-time timeline."""

    peak_activations: dict[int, int]
    ticks: dict[int, list[tuple[int, Action]]] = field(default_factory=dict)
    num_ticks: int = 0


@dataclass
class _SimResult:
    """Outcome of the lock-step simulation (possibly stuck before completion)."""

    ticks: dict[int, list[tuple[int, Action]]]
    num_ticks: int
    stuck: dict[int, tuple[Action, list[Action]]]  # rank -> (blocked action, missing deps)


def _deps(action: Action, K: int, V: int) -> list[Action]:
    """Compute actions whose results `action` consumes.

    A backward's upstream gradient comes from the next stage's B or I, written B here (see
    _done_key); W needs the I that produced its inputs, written B too.
    """
    s, m = action.stage, action.microbatch
    if action.kind == Kind.F:
        return [Action(s - 1, Kind.F, m)] if s > 0 else []
    if action.kind in BACKWARD_KINDS:
        up = [Action(s + 1, Kind.B, m)] if s < K * V - 1 else []
        return [Action(s, Kind.F, m), *up]
    return [Action(s, Kind.B, m)]


def _done_key(action: Action) -> Action:
    """What a finished action provides, as _deps names it: an I provides the gradient a B
    would."""
    return Action(action.stage, Kind.B, action.microbatch) if action.kind == Kind.I else action


def _simulate(schedule: Schedule, K: int, V: int) -> _SimResult:
    """Run all ranks in lock-step unit ticks; stop when done or nobody can progress."""
    queues = {r: [a for a in schedule.get(r, []) if a.is_compute] for r in range(K)}
    pos = dict.fromkeys(queues, 0)
    done: set[Action] = set()
    ticks: dict[int, list[tuple[int, Action]]] = {r: [] for r in queues}
    tick = 0
    while any(pos[r] < len(queues[r]) for r in queues):
        ran = []
        for r, queue in queues.items():
            if pos[r] < len(queue) and all(d in done for d in _deps(queue[pos[r]], K, V)):
                ran.append(queue[pos[r]])
                ticks[r].append((tick, queue[pos[r]]))
                pos[r] += 1
        if not ran:
            stuck = {
                r: (q[pos[r]], [d for d in _deps(q[pos[r]], K, V) if d not in done])
                for r, q in queues.items()
                if pos[r] < len(q)
            }
            return _SimResult(ticks, tick, stuck)
        # Results become visible only next tick: unit-time compute.
        done.update(_done_key(a) for a in ran)
        tick += 1
    return _SimResult(ticks, tick, {})


# ---------------------------------------------------------------- rendering


def _mark_compute(mark: Action) -> Action:
    """Compute action a (possibly comm) mark refers to on the compute-only grid."""
    if mark.is_compute:
        return mark
    kind = Kind.F if mark.kind in (Kind.SEND_F, Kind.RECV_F) else Kind.B
    return Action(mark.stage, kind, mark.microbatch)  # (a SEND_B/RECV_B of an I marks B)


def _grid_cells(sim: _SimResult, K: int, mark: tuple[int, Action] | None) -> dict[int, dict]:
    """Per-rank {column: text}, bracketing the marked action (appended if never run)."""
    cells = {r: {t: str(a) for t, a in sim.ticks.get(r, [])} for r in range(K)}
    if mark is None:
        return cells
    rank, action = mark
    target = _mark_compute(action)
    row = cells.setdefault(rank, {})
    hits = [t for t, a in sim.ticks.get(rank, []) if target in (a, _done_key(a))]
    # An action that never ran (stuck/missing) is drawn just after the rank's last compute.
    col = hits[0] if hits else max(row, default=-1) + 1
    row[col] = f"[{target}]"
    return cells


def _render(sim: _SimResult, K: int, mark: tuple[int, Action] | None) -> str:
    """Draw a rank x tick grid from a simulation result."""
    cells = _grid_cells(sim, K, mark)
    ncols = max([sim.num_ticks] + [max(row, default=-1) + 1 for row in cells.values()])
    width = max([len(c) for row in cells.values() for c in row.values()] + [len(str(ncols))])
    label = max(len(f"rank {r}") for r in range(K))
    header = f"{'tick':<{label}} |" + "".join(f" {t:^{width}}" for t in range(ncols))
    lines = [header.rstrip()]
    for r in range(K):
        row = "".join(f" {cells[r].get(t, ''):^{width}}" for t in range(ncols))
        lines.append(f"{f'rank {r}':<{label}} |{row}".rstrip())
    if mark is not None:
        lines.append(f"[] marks rank {mark[0]} action {mark[1]}")
    return "\n".join(lines)


def render_grid(
    schedule: Schedule, K: int, M: int, V: int = 1, mark: tuple[int, Action] | None = None
) -> str:
    """Rank x time text grid of compute actions; blanks are bubbles. mark=(rank, action)."""
    del M  # the timeline is fully determined by the actions themselves
    return _render(_simulate(schedule, K, V), K, mark)


# ---------------------------------------------------------------- validation


class _Checker:
    """Holds the schedule under validation so errors can attach the grid picture."""

    def __init__(self, schedule: Schedule, K: int, M: int, V: int, forward_only=False) -> None:
        self.schedule, self.K, self.M, self.V = schedule, K, M, V
        self.num_stages = K * V
        self.forward_only = forward_only
        self.place = loop_placement(K, V)  # check_structure reads the schedule's own

    def owner(self, stage: int) -> int:
        """The rank holding a stage (the schedule's placement; round robin out of range)."""
        return self.place[stage] if 0 <= stage < self.num_stages else stage % self.K

    def fail(self, rank: int, action: Action, message: str) -> None:
        """Raise ScheduleError naming rank/action, with the marked grid attached."""
        grid = render_grid(self.schedule, self.K, self.M, self.V, mark=(rank, action))
        raise ScheduleError(f"rank {rank}, action {action}: {message}\n{grid}")

    def check_structure(self) -> None:
        """Ranks, stages and microbatches in range; each stage on its own rank."""
        for rank, actions in self.schedule.items():
            if not 0 <= rank < self.K:
                raise ScheduleError(f"rank {rank} out of range: K={self.K} ranks (0..{self.K - 1})")
            for a in actions:
                if not isinstance(a, Action) or not isinstance(a.kind, Kind):
                    raise ScheduleError(f"rank {rank}: {a!r} is not an Action")
                if not 0 <= a.stage < self.num_stages:
                    self.fail(rank, a, f"stage {a.stage} out of range 0..{self.num_stages - 1}")
                if not 0 <= a.microbatch < self.M:
                    self.fail(rank, a, f"microbatch {a.microbatch} out of range 0..{self.M - 1}")
        owners = stage_owners(self.schedule)
        stray = misplaced(self.schedule, owners)
        if stray is not None:
            rank, a = stray
            self.fail(rank, a, f"stage {a.stage} lives on rank {owners[a.stage]}, not rank {rank}")
        self.place = tuple(owners.get(s, s % self.K) for s in range(self.num_stages))
        self._check_placement()
        for rank, actions in self.schedule.items():
            for a in actions:
                if not a.is_compute and self.owner(a.stage) != rank:
                    owner = self.owner(a.stage)
                    self.fail(rank, a, f"stage {a.stage} lives on rank {owner}, not rank {rank}")

    def _check_placement(self) -> None:
        """Every rank holds V stages (the runtime and the partition build V chunks a rank)."""
        for rank in range(self.K):
            held = stages_of(self.place, rank)
            if len(held) != self.V:
                raise ScheduleError(
                    f"rank {rank} runs stages {held}: each of the K={self.K} ranks must run "
                    f"V={self.V} of the {self.num_stages} stages (round robin s % K, or the "
                    "V shape r and 2K-1-r)"
                )

    def check_coverage(self) -> None:
        """Every (stage, microbatch) has exactly one F and either one B or one I and one W.

        Forward-only: exactly one F each, and no backward action (B, I, W, SEND_B, RECV_B).
        """
        for rank, actions in self.schedule.items():
            # Duplicate comm actions are reported by check_matching, with the peer's view.
            counts = Counter(a for a in actions if a.is_compute)
            for a, n in counts.items():
                if n > 1:
                    self.fail(rank, a, f"appears {n} times (microbatch {a.microbatch})")
            if self.forward_only:
                for a in actions:
                    if a.kind not in (Kind.F, Kind.SEND_F, Kind.RECV_F):
                        self.fail(rank, a, "a forward-only schedule has no backward actions")
        for s in range(self.num_stages):
            rank = self.owner(s)
            present = set(self.schedule.get(rank, []))
            for m in range(self.M):
                if Action(s, Kind.F, m) not in present:
                    self.fail(rank, Action(s, Kind.F, m), f"missing (microbatch {m})")
                if not self.forward_only:
                    self._check_backward(rank, present, s, m)

    def _check_backward(self, rank: int, present: set, s: int, m: int) -> None:
        """One backward per (stage, microbatch): B, or I with its W."""
        full, first, weight = (Action(s, k, m) in present for k in (Kind.B, Kind.I, Kind.W))
        if full and (first or weight):
            other = Action(s, Kind.I if first else Kind.W, m)
            self.fail(
                rank, other, f"microbatch {m} also has a full backward {Action(s, Kind.B, m)}"
            )
        if not (full or first):
            self.fail(rank, Action(s, Kind.B, m), f"missing (microbatch {m}): no B, nor I with W")
        if first != weight:
            missing = Action(s, Kind.W if first else Kind.I, m)
            self.fail(rank, missing, f"missing (microbatch {m}): a split backward needs I and W")

    def check_local_order(self) -> None:
        """B and I after F, W after I, SEND after its producer, RECV before its consumer."""
        for rank, actions in self.schedule.items():
            index = {a: i for i, a in enumerate(actions)}
            for i, a in enumerate(actions):
                self._check_action_order(rank, a, i, index)
            for a in actions:
                if a.is_compute:
                    self._check_required_comm(rank, a, index)

    def _check_action_order(self, rank: int, a: Action, i: int, index: dict) -> None:
        """Check one action against the local action it must follow or precede."""
        kind = a.kind
        if kind in _MUST_FOLLOW:
            first = self._partner(index, a, _MUST_FOLLOW[kind])
            if index.get(first, len(index)) > i:
                self.fail(rank, a, f"must come after {first} on the same rank")
        elif kind in _MUST_PRECEDE:
            consumer = self._partner(index, a, _MUST_PRECEDE[kind])
            if index.get(consumer, -1) < i:
                self.fail(rank, a, f"must come before {consumer}, which consumes it")

    @classmethod
    def _partner(cls, index: dict, a: Action, kind: Kind | None) -> Action:
        """The action of a's (stage, micro-batch) of the given kind (None: its backward)."""
        if kind is None:
            return cls._backward_of(index, a.stage, a.microbatch)
        return Action(a.stage, kind, a.microbatch)

    @staticmethod
    def _backward_of(index: dict, s: int, m: int) -> Action:
        """The backward of (s, m) this rank runs: its I if it has one, else B."""
        split = Action(s, Kind.I, m)
        return split if split in index else Action(s, Kind.B, m)

    def _check_required_comm(self, rank: int, a: Action, index: dict) -> None:
        """A compute with a remote neighbour needs its RECV posted and its SEND issued."""
        recv = _recv_for(a, rank, self.place)
        if recv is not None and recv not in index:
            peer = self.owner(_peer_stage(recv))
            self.fail(rank, a, f"missing {recv}: microbatch {a.microbatch} input from rank {peer}")
        send = _send_for(a, rank, self.place)
        if send is not None and send not in index:
            peer = self.owner(_peer_stage(send))
            self.fail(rank, a, f"missing {send}: microbatch {a.microbatch} output to rank {peer}")

    def check_matching(self) -> None:
        """Each SEND has exactly one RECV on the peer rank, and vice versa."""
        counts = {r: Counter(acts) for r, acts in self.schedule.items()}
        for rank, actions in self.schedule.items():
            for a in actions:
                if not a.is_compute:
                    self._check_peer(rank, a, counts)

    def _check_peer(self, rank: int, a: Action, counts: dict[int, Counter]) -> None:
        """Check one comm action has a legal peer and a single matching counterpart."""
        peer_stage = _peer_stage(a)
        if not 0 <= peer_stage < self.num_stages:
            self.fail(rank, a, f"no peer stage {peer_stage} (stages 0..{self.num_stages - 1})")
        peer = self.owner(peer_stage)
        if peer == rank:
            self.fail(rank, a, f"peer stage {peer_stage} is on the same rank; no comm allowed")
        twin = _counterpart(a)
        mine, theirs = counts[rank][a], counts.get(peer, Counter())[twin]
        if mine != 1 or theirs != 1:
            self.fail(
                rank,
                a,
                f"posted {mine} time(s) but needs exactly one match: peer rank {peer} "
                f"has {theirs} {twin} (microbatch {a.microbatch})",
            )

    def check_deadlock(self) -> _SimResult:
        """Simulate lock-step execution; fail naming each stuck rank and what it awaits."""
        sim = _simulate(self.schedule, self.K, self.V)
        if not sim.stuck:
            return sim
        reasons = [
            f"rank {r} stuck on {a} waiting for "
            + ", ".join(f"{d} (rank {self.owner(d.stage)})" for d in missing)
            for r, (a, missing) in sorted(sim.stuck.items())
        ]
        rank, (action, _) = min(sim.stuck.items())
        grid = _render(sim, self.K, (rank, action))
        raise ScheduleError(
            f"deadlock at tick {sim.num_ticks}: " + "; ".join(reasons) + f"\n{grid}"
        )


def _peer_stage(a: Action) -> int:
    """Stage on the other end of a comm action."""
    return a.stage + 1 if a.kind in (Kind.SEND_F, Kind.RECV_B) else a.stage - 1


def _counterpart(a: Action) -> Action:
    """The comm action the peer must post to match `a`."""
    twin = {
        Kind.SEND_F: Kind.RECV_F,
        Kind.RECV_F: Kind.SEND_F,
        Kind.SEND_B: Kind.RECV_B,
        Kind.RECV_B: Kind.SEND_B,
    }
    return Action(_peer_stage(a), twin[a.kind], a.microbatch)


def peak_microbatches(actions: Sequence[Action], forward_only: bool = False) -> int:
    """Most micro-batches one rank's actions hold at once: from F until B (split: until W).

    Forward-only: an F's input is freed when it ran and its output when sent (or consumed by
    the next local stage), so a rank holds at most the one micro-batch it is working on.
    """
    if forward_only:
        return int(any(a.kind == Kind.F for a in actions))
    live = peak = 0
    for a in actions:
        if a.kind == Kind.F:
            live += 1
        elif a.kind in (Kind.B, Kind.W):
            live -= 1
        peak = max(peak, live)
    return peak


def _peak_activations(schedule: Schedule, K: int, forward_only: bool = False) -> dict[int, int]:
    """Max over time of micro-batches held on each rank."""
    return {rank: peak_microbatches(schedule.get(rank, []), forward_only) for rank in range(K)}


def validate(
    schedule: Schedule, K: int, M: int, V: int = 1, forward_only: bool = False
) -> ValidationReport:
    """Check coverage, local order, comm matching and deadlock freedom; raise ScheduleError.

    forward_only: an evaluation schedule (one F per stage and micro-batch, no backward at all)
    instead of a training one (every F has its B).
    """
    _check_sizes(K, M, V)
    checker = _Checker(schedule, K, M, V, forward_only)
    checker.check_structure()
    checker.check_coverage()
    checker.check_local_order()
    checker.check_matching()
    sim = checker.check_deadlock()
    peaks = _peak_activations(schedule, K, forward_only)
    return ValidationReport(peaks, sim.ticks, sim.num_ticks)


# ---------------------------------------------------------------- CSV


def to_csv(schedule: Schedule, compute_only: bool = False) -> str:
    """One row per rank (0..max rank), comma-separated action strings, like torch's _dump_csv.

    With its SEND/RECV actions the file is torch's "compute_comms" format; compute_only keeps
    F, B, I and W: its "compute_only" format, which every torch multi-stage schedule loads.
    """
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    for rank in range(max(schedule, default=-1) + 1):
        actions = schedule.get(rank, [])
        writer.writerow([str(a) for a in actions if a.is_compute or not compute_only])
    return buf.getvalue()


# torch's FSDP bookkeeping in a compute_comms dump: nothing to run without FSDP
TORCH_ONLY_ACTIONS = re.compile(r"\d+(UNSHARD|RESHARD|REDUCE_GRAD)\d*")
# torch's DualPipeV pairs a forward and a backward as "(0F1;3B0)OVERLAP_F_B"
_OVERLAP_RE = re.compile(r"\((.*)\)OVERLAP_F_B")


def from_csv(text: str) -> Schedule:
    """Parse to_csv / torch's _dump_csv (either format); empty cells (torch's idle None
    slots) and torch's FSDP actions (UNSHARD, RESHARD, REDUCE_GRAD) are skipped, and an
    OVERLAP_F_B pair runs as its two actions in order.

    hpcpipe before torch's notation wrote a split backward's first half as B: a B whose W is
    on the same rank is read as the I it was.
    """
    rows = csv.reader(io.StringIO(text))
    schedule = {
        rank: [a for cell in row for a in _parse_cell(cell)] for rank, row in enumerate(rows)
    }
    return {rank: _split_legacy_backwards(actions) for rank, actions in schedule.items()}


def _parse_cell(cell: str) -> list[Action]:
    """The actions one CSV cell holds: none, one, or an overlapped pair."""
    cell = cell.strip()
    if not cell or TORCH_ONLY_ACTIONS.fullmatch(cell):
        return []
    overlap = _OVERLAP_RE.fullmatch(cell)
    if overlap:
        return [Action.parse(part) for part in overlap.group(1).split(";") if part.strip()]
    return [Action.parse(cell)]


def csv_dimensions(schedule: Schedule) -> tuple[int, int, int]:
    """(K, M, V) a CSV schedule names: its rows, micro-batches and stages per rank."""
    K = max(schedule, default=-1) + 1
    actions = [a for acts in schedule.values() for a in acts]
    if K == 0 or not actions:
        raise ScheduleError("the CSV schedule has no actions")
    stages = max(a.stage for a in actions) + 1
    if stages % K:
        raise ScheduleError(
            f"the CSV schedule names {stages} stages on {K} ranks: stages must be a multiple of "
            "the ranks (V chunks each)"
        )
    return K, max(a.microbatch for a in actions) + 1, stages // K


def load_csv_schedule(path: str, K: int, M: int, V: int = 1) -> Schedule:
    """A schedule from a CSV file (to_csv's, or torch's _dump_csv of its own schedules),
    lowered with hpcpipe's SEND/RECV placement and validated for K ranks, M, V.

    Only the compute order is read: the file's own SEND/RECV (torch's compute_comms) are
    dropped and placed again by add_send_recv, which the runtime's receive posting expects.
    """
    schedule = read_csv_schedule(path)
    named = csv_dimensions(schedule)
    if named != (K, M, V):
        raise ScheduleError(
            f"{path} is a schedule of K={named[0]} ranks, M={named[1]} micro-batches and "
            f"V={named[2]} chunks per rank, but the run has pp={K}, schedule.microbatches={M} "
            f"and schedule.virtual={V}; set those to the file's or write a schedule for them"
        )
    lowered = add_send_recv(schedule, K, V)
    validate(lowered, K, M, V)
    return lowered


def read_csv_schedule(path: str) -> Schedule:
    """from_csv of a file, its errors as ScheduleError naming the file."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ScheduleError(f"cannot read the schedule CSV {path}: {exc.strerror}") from None
    try:
        return from_csv(text)
    except ValueError as exc:
        raise ScheduleError(f"{path}: {exc}") from None


def uses_split_backward(schedule: Schedule) -> bool:
    """Whether the schedule splits its backwards into I and W (the runtime needs a weight
    store for that)."""
    return any(a.kind == Kind.I for actions in schedule.values() for a in actions)


def _split_legacy_backwards(actions: list[Action]) -> list[Action]:
    """B -> I for every B with a W of the same (stage, microbatch) in `actions`."""
    weights = {(a.stage, a.microbatch) for a in actions if a.kind == Kind.W}
    return [
        Action(a.stage, Kind.I, a.microbatch)
        if a.kind == Kind.B and (a.stage, a.microbatch) in weights
        else a
        for a in actions
    ]
