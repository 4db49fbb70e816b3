"""zb-auto: the fastest schedule the simulator finds for given costs under a memory limit.

The Zero Bubble paper's automatic scheduler (ZB-1p, ZB-2p) list-schedules F, I and W under a
memory limit with the measured T_F, T_B, T_W and T_comm, tries a few warm-up depths and keeps
the fastest. hpcpipe does the same (greedy.list_schedule at every limit up to the one given,
preferring the I or the F when both could start) and adds the handcrafted one-chunk schedules
that fit the limit (gpipe, 1f1b, zb-h1, zb-h2) as candidates, so the result is never slower
than any of them. Candidates are ranked by the same simulator `hpcpipe schedule` reports,
ties by lower peak memory; the winner is validated like every schedule.
"""

from __future__ import annotations

import math

from hpcpipe.pipeline.greedy import list_schedule
from hpcpipe.pipeline.schedule import (
    Action,
    Kind,
    Schedule,
    ScheduleError,
    add_send_recv,
    compute_1f1b,
    compute_gpipe,
    compute_zb_h1,
    compute_zb_h2,
    peak_microbatches,
)
from hpcpipe.pipeline.simulate import Costs, simulate

AUTO = "zb-auto"
HANDCRAFTED = {"gpipe": compute_gpipe, "1f1b": compute_1f1b, "zb-h1": compute_zb_h1,
               "zb-h2": compute_zb_h2}  # fmt: skip


def held_limit(K: int, M: int, memory_limit: float) -> int:
    """Micro-batches a rank may hold: memory_limit times 1F1B's peak (min(K, M)).

    Raises ScheduleError when that is under one micro-batch (no schedule can run).
    """
    if not memory_limit > 0:
        raise ScheduleError(f"schedule.memory_limit must be > 0 (got {memory_limit})")
    limit = math.floor(memory_limit * min(K, M) + 1e-9)
    if limit < 1:
        raise ScheduleError(
            f"schedule.memory_limit={memory_limit} x 1F1B's peak of {min(K, M)} micro-batches "
            "is under one micro-batch; use a memory_limit of at least "
            f"{1 / min(K, M):.3g}"
        )
    return limit


def peak(schedule: Schedule) -> int:
    """The most micro-batches any rank holds."""
    return max(peak_microbatches(actions) for actions in schedule.values())


def candidates(K: int, M: int, costs: Costs, limit: int):
    """(label, compute-only schedule) of every schedule zb-auto considers."""
    raw = (costs.t_f, costs.t_b, costs.t_w, costs.hop())
    for held in range(1, min(limit, M) + 1):
        for prefer_forward in (False, True):
            order = list_schedule(K, M, raw, held, prefer_forward)
            label = f"list {held}{' F-first' if prefer_forward else ''}"
            yield label, {r: [Action(r, Kind(k), m) for k, m in acts] for r, acts in order.items()}
    for name, generate in HANDCRAFTED.items():
        schedule = generate(K, M)
        if peak(schedule) <= limit:
            yield name, schedule


def auto_schedule(K: int, M: int, costs: Costs, memory_limit: float = 1.0) -> Schedule:
    """The compute order (F, I and W per rank) of the fastest candidate under the limit.

    A winner with full backwards (1f1b, gpipe) runs each as its I right before its W: the same
    work and peak, the upstream gradient no later, and always a split backward, so the
    runtime's weight store and the memory accounting do not depend on which candidate won.
    """
    limit = held_limit(K, M, memory_limit)
    best = None
    for _, schedule in candidates(K, M, costs, limit):
        lowered = add_send_recv(schedule, K)
        # rounded: candidates equal but for float noise tie, and the smaller peak wins
        key = (round(simulate(lowered, K, M, 1, costs).step_time, 9), peak(schedule))
        if best is None or key < best[0]:
            best = (key, schedule)
    return split_backwards(best[1])


def split_backwards(schedule: Schedule) -> Schedule:
    """Every B as I then W, in its place."""
    out: Schedule = {}
    for rank, actions in schedule.items():
        out[rank] = []
        for a in actions:
            if a.kind == Kind.B:
                out[rank] += [
                    Action(a.stage, Kind.I, a.microbatch),
                    Action(a.stage, Kind.W, a.microbatch),
                ]
            else:
                out[rank].append(a)
    return out
