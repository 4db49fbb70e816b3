"""Split-backward schedules by list scheduling under a memory limit (one chunk per rank).

The Zero Bubble paper's automatic scheduler (Qi et al., 2023, section 3) places each rank's
F, I (input gradient) and W (weight gradient) passes greedily in time: a rank that is free
runs an I when its gradient has arrived (the upstream ranks wait for it), else an F when its
input has arrived and the rank holds fewer than `limit` micro-batches (an F acquires one,
its W gives it back), else a deferred W (which fills what would be idle time). With unit
costs and limit 2K - 1 this is ZB-H2's order; with measured costs it is what zb-auto starts
from (hpcpipe.pipeline.autoschedule).

Pure Python on floats: hpcpipe.pipeline.schedule imports it to build zb-h2.
"""

from __future__ import annotations


def list_schedule(
    K: int, M: int, costs: tuple[float, float, float, float], limit: int, prefer_forward=False
) -> dict[int, list[tuple[str, int]]]:
    """Per rank its ("F" | "I" | "W", microbatch) in run order.

    costs: (T_F, T_B, T_W, T_comm) of one rank's stage. prefer_forward: when both an F and an
    I could start, run the F (fills the pipeline sooner; the default runs the I, which frees
    the upstream ranks sooner).
    """
    if limit < 1:
        raise ValueError(f"a rank must be able to hold at least 1 micro-batch (limit={limit})")
    t_f, t_b, t_w, comm = costs
    duration = {"F": t_f, "I": t_b, "W": t_w}
    free = [0.0] * K
    done = {"F": [0] * K, "I": [0] * K, "W": [0] * K}  # next micro-batch of each kind
    ends = {"F": [[None] * M for _ in range(K)], "I": [[None] * M for _ in range(K)]}
    order: dict[int, list[tuple[str, int]]] = {r: [] for r in range(K)}
    left = [3 * M] * K

    def ready(kind: str, r: int) -> float | None:
        """When rank r's next `kind` may start by its inputs, None if not yet known."""
        m = done[kind][r]
        if kind == "F":
            if m >= M or m - done["W"][r] >= limit:
                return None
            return 0.0 if r == 0 else _plus(ends["F"][r - 1][m], comm)
        if m >= done["F"][r]:
            return None  # its forward has not run here yet
        if r == K - 1:
            return ends["F"][r][m]
        return _plus(ends["I"][r + 1][m], comm)

    stalled = [-1.0] * K  # the time a rank last found nothing to start
    while any(left):
        # the earliest free rank; at equal times one that found nothing to do goes last
        r = min((q for q in range(K) if left[q]), key=lambda q: (free[q], stalled[q] == free[q], q))
        now = free[r]
        starts = {kind: ready(kind, r) for kind in ("I", "F")}
        choices = ("F", "I") if prefer_forward else ("I", "F")
        kind = next((k for k in choices if starts[k] is not None and starts[k] <= now), None)
        if kind is None and done["W"][r] < done["I"][r]:
            kind = "W"
        if kind is None and stalled[r] != now:  # the other ranks free now go first
            stalled[r] = now
            continue
        if kind is None:  # idle until an input could arrive or another rank moves on
            later = [free[q] for q in range(K) if q != r and left[q] and free[q] > now]
            later += [  # when some rank's input arrives (this one's, or one it waits on)
                t
                for q in range(K)
                if left[q]
                for t in (ready("I", q), ready("F", q))
                if t is not None and t > now
            ]
            if not later:
                raise RuntimeError(f"list scheduling stalled on rank {r} at time {now}")
            free[r] = min(later)
            continue
        m = done[kind][r]
        done[kind][r] += 1
        free[r] = now + duration[kind]
        if kind in ends:
            ends[kind][r][m] = free[r]
        order[r].append((kind, m))
        left[r] -= 1
    return order


def _plus(end: float | None, comm: float) -> float | None:
    return None if end is None else end + comm
