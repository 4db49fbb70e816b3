"""Measured timelines: gather every rank's action times into one Chrome/Perfetto trace.

Times are seconds since an origin taken right after a barrier on every rank, so rows line up
to within the barrier's exit skew (microseconds on one node) without a global clock.
"""

from __future__ import annotations

import json
from pathlib import Path

from hpcpipe.pipeline.draw import to_chrome_trace
from hpcpipe.pipeline.schedule import Action, Kind
from hpcpipe.pipeline.simulate import Timed, as_timeline

COMPUTE = {"F", "B", "I", "W"}


def local_events(trace: list, origin: float, rank: int) -> list[dict]:
    """This rank's (action, start, end) records as plain dicts relative to the origin."""
    return [
        {"rank": rank, "action": str(a), "start": start - origin, "end": end - origin}
        for a, start, end in trace
    ]


def compute_timeline(events: list[dict]) -> list[Timed]:
    """The F/B/W events as a timeline the simulator and the drawer understand."""
    return as_timeline([e for e in events if Action.parse(e["action"]).kind.value in COMPUTE])


def send_arrows(events: list[dict], K: int) -> list[tuple[int, float, int, float]]:
    """One arrow per message: from the SEND on one rank to the compute that consumed it."""
    starts = {(e["rank"], e["action"]): e["start"] for e in events}
    # where each stage ran (round robin or V shape): the rank of its compute events
    owner = {a.stage: e["rank"] for e in events if (a := Action.parse(e["action"])).is_compute}
    arrows = []
    for e in events:
        a = Action.parse(e["action"])
        if a.kind == Kind.SEND_F:
            consumer = Action(a.stage + 1, Kind.F, a.microbatch)
        elif a.kind == Kind.SEND_B:  # consumed by a full backward or a split one's I
            consumer = Action(a.stage - 1, Kind.B, a.microbatch)
            split = Action(a.stage - 1, Kind.I, a.microbatch)
            dst = owner.get(consumer.stage, consumer.stage % K)
            consumer = split if (dst, str(split)) in starts else consumer
        else:
            continue
        dst = owner.get(consumer.stage, consumer.stage % K)
        if (dst, str(consumer)) in starts:
            arrows.append((e["rank"], e["start"], dst, starts[(dst, str(consumer))]))
    return arrows


def measured_bubble(events: list[dict], K: int) -> float:
    """Mean over ranks of the fraction of the step a rank was not computing."""
    timeline = compute_timeline(events)
    if not timeline:
        return 0.0
    span = max(t.end for t in timeline) - min(t.start for t in timeline)
    busy = {r: 0.0 for r in range(K)}
    for t in timeline:
        busy[t.rank] += t.end - t.start
    return sum(1 - b / span for b in busy.values()) / K


def write_trace(path: str | Path, events: list[dict], meta: dict) -> dict:
    """Write the merged Chrome trace (+ hpcpipe's own record for `hpcpipe schedule --fit`)."""
    K = meta["K"]
    trace = to_chrome_trace(compute_timeline(events), K, arrows=send_arrows(events, K))
    meta = {**meta, "measured_bubble": measured_bubble(events, K)}
    trace["hpcpipe"] = {**meta, "events": events}
    trace["displayTimeUnit"] = "ms"
    Path(path).write_text(json.dumps(trace))
    return meta


def read_trace(path: str | Path) -> tuple[dict, list[dict]]:
    """(metadata, events) of a trace written by write_trace."""
    data = json.loads(Path(path).read_text())
    if "hpcpipe" not in data:
        raise ValueError(f"{path} is not an hpcpipe trace (written by `hpcpipe train --trace`)")
    record = dict(data["hpcpipe"])
    return record, record.pop("events")
