"""PipeDream-2BW (Narayanan et al., "Memory-Efficient Pipeline-Parallel DNN Training", 2021).

1F1B without the flush: rank r runs [F(i + w_r), B(i)] for i < M in every step, w_r = K-1-r,
so the pipeline never drains. Forwards with an index >= M belong to the NEXT batch (its first
w_r micro-batches); the runtime keeps their state across the step boundary and renumbers it
(m - M). Batch t runs on weights W(t-1) and the optimizer makes W(t+1) = W(t) - step(g(t)), so
each rank keeps two weight versions (staleness 1). The first step of a run is preceded by the
warm-up: the w_r forwards of its own batch that the step before would have run.

Every receive is posted in the step whose sends it matches: a step ends with the RECV_F of the
next step's first forward (posted one compute early, as everywhere), so that the end-of-step
flush of sends never waits on a receive the next step would post (rendezvous-size messages).
"""

from __future__ import annotations

from hpcpipe.pipeline.schedule import (
    Action,
    Kind,
    Schedule,
    ScheduleError,
    loop_placement,
    peak_microbatches,
    validate,
)

NAME = "2bw"


def early_forwards(K: int, rank: int) -> int:
    """w_r: forwards of the next batch that rank r runs at the end of each step."""
    return K - 1 - rank


def check_sizes(K: int, M: int, V: int = 1) -> None:
    """2BW is V = 1 and needs M >= K-1: rank 0 runs K-1 forwards of the next batch, and a
    batch beyond that one would need a third weight version."""
    if V != 1:
        raise ScheduleError(f"2bw supports only V=1 (one chunk per rank), got V={V}")
    if M < K - 1:
        raise ScheduleError(
            f"2bw needs schedule.microbatches >= pp - 1 = {K - 1} (got M={M}): rank 0 runs the "
            f"next batch's first K-1 forwards inside each step; raise schedule.microbatches "
            "or use 1f1b"
        )


def compute_steady(K: int, M: int) -> Schedule:
    """The compute order of every step: [F(i + w_r), B(i)] for i < M on rank r."""
    schedule: Schedule = {}
    for rank in range(K):
        w = early_forwards(K, rank)
        actions: list[Action] = []
        for i in range(M):
            actions += [Action(rank, Kind.F, i + w), Action(rank, Kind.B, i)]
        schedule[rank] = actions
    return schedule


def _lower(compute: list[Action], rank: int, K: int) -> list[Action]:
    """Comm for one rank as every schedule has it (a RECV one compute early, a SEND right
    after), with `compute`'s last action only there to place its RECV: it and its SEND go."""
    from hpcpipe.pipeline.schedule import _lower_rank  # the one lowering every schedule uses

    lowered = _lower_rank(compute, rank, loop_placement(K))
    cut = lowered.index(compute[-1])
    return lowered[:cut]


def steady_step(K: int, M: int) -> Schedule:
    """The lowered program of every step. Its first forward's RECV_F belongs to the step
    before (dropped here); it ends with the RECV_F of the next step's first forward."""
    check_sizes(K, M)
    out: Schedule = {}
    for rank, compute in compute_steady(K, M).items():
        w = early_forwards(K, rank)
        lowered = _lower([*compute, Action(rank, Kind.F, M + w)], rank, K)
        if rank > 0:
            assert lowered[0] == Action(rank, Kind.RECV_F, w), lowered[0]
            lowered = lowered[1:]
        out[rank] = lowered
    return out


def warmup(K: int, M: int) -> Schedule:
    """What the first step of a run (fresh or resumed) runs before steady_step: the w_r
    forwards of its own batch, and the RECV_F of the step's first forward."""
    check_sizes(K, M)
    out: Schedule = {}
    for rank in range(K):
        w = early_forwards(K, rank)
        compute = [Action(rank, Kind.F, m) for m in range(w + 1)]
        out[rank] = _lower(compute, rank, K)
    return out


def renumber(actions: list[Action], offset: int) -> list[Action]:
    """The same actions, micro-batch indices shifted by `offset`."""
    return [Action(a.stage, a.kind, a.microbatch + offset) for a in actions]


def unrolled(K: int, M: int, steps: int) -> Schedule:
    """warm-up + `steps` steps as one program over steps*M micro-batches; the last step's
    forwards of the batch after (and their comm) left out: that is 1F1B over steps*M."""
    start, step = warmup(K, M), steady_step(K, M)
    out: Schedule = {}
    for rank in range(K):
        actions = list(start[rank])
        for t in range(steps):
            actions += renumber(step[rank], t * M)
        out[rank] = [a for a in actions if a.microbatch < steps * M]
    return out


def unmatched_sends(program: Schedule) -> list[tuple[int, Action]]:
    """Sends of one step's program whose receive no rank posts in that program (must be
    none: a step ends waiting for its sends, and a receive the next step would post is too
    late for a message above the eager limit)."""
    posted = {(a.stage, a.kind, a.microbatch) for acts in program.values() for a in acts}
    missing = []
    for rank, actions in program.items():
        for a in actions:
            if a.kind in (Kind.SEND_F, Kind.SEND_B):
                peer = a.stage + 1 if a.kind == Kind.SEND_F else a.stage - 1
                kind = Kind.RECV_F if a.kind == Kind.SEND_F else Kind.RECV_B
                if (peer, kind, a.microbatch) not in posted:
                    missing.append((rank, a))
    return missing


def first_step(K: int, M: int) -> Schedule:
    """What the first step of a run runs: the warm-up, then the steady step."""
    start, step = warmup(K, M), steady_step(K, M)
    return {rank: start[rank] + step[rank] for rank in range(K)}


def build(K: int, M: int, V: int = 1) -> Schedule:
    """The validated steady step: three unrolled steps are a valid 1F1B-like program over 3M
    micro-batches (coverage, order, matching, no deadlock) and no send waits on the next step."""
    check_sizes(K, M, V)
    validate(unrolled(K, M, 3), K, 3 * M, 1)
    missing = unmatched_sends(steady_step(K, M)) + unmatched_sends(first_step(K, M))
    if missing:
        rank, action = missing[0]
        raise ScheduleError(f"2bw: rank {rank}'s {action} has no receive in its step")
    return steady_step(K, M)


def peak_activations(K: int, M: int) -> dict[int, int]:
    """Most micro-batches each rank holds at once in any step (warm-up included): w_r + 1, as
    1F1B's; at M = K-1 rank 0 holds one more than M (the next batch's first K-1 and one)."""
    program = unrolled(K, M, 3)
    return {rank: peak_microbatches(program[rank]) for rank in range(K)}


def steady_state(K: int, M: int, costs, steps: int = 4):
    """(seconds per step once the pipeline is full, its bubble rate, the simulation of
    `steps` steps in a row) under simulate.Costs: the span `steps` steps add over
    `steps` - 1, since no step drains (W folds into B: 2BW's backward is whole)."""
    from hpcpipe.pipeline.simulate import Costs, simulate

    whole = Costs(costs.t_f, costs.t_b + costs.t_w, 0.0, costs.t_comm)
    longer = simulate(unrolled(K, M, steps), K, steps * M, 1, whole)
    shorter = simulate(unrolled(K, M, steps - 1), K, (steps - 1) * M, 1, whole)
    step = longer.step_time - shorter.step_time
    ideal = M * (whole.t_f + whole.t_b)
    return step, (step - ideal) / step if step else 0.0, longer
