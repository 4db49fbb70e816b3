"""Pictures of schedules and timelines: JSON, Chrome/Perfetto traces and PNG charts.

Text grids and CSV live in hpcpipe.schedule (render_grid, to_csv).
"""

from __future__ import annotations

from collections.abc import Iterable

from hpcpipe.pipeline.schedule import Kind, Schedule
from hpcpipe.pipeline.simulate import SimResult, Timed, as_timeline

Arrow = tuple[int, float, int, float]  # (src_rank, src_time, dst_rank, dst_time)

COLOURS = {Kind.F: "#4c72b0", Kind.B: "#55a868", Kind.I: "#8fbf6f", Kind.W: "#c44e52"}
_FONT_PT = 6


def to_json(schedule: Schedule, K: int, M: int, V: int, sim: SimResult) -> dict:
    """Schedule (action strings, one list per rank) plus the simulation result."""
    return {
        "K": K,
        "M": M,
        "V": V,
        "schedule": [[str(a) for a in schedule.get(r, [])] for r in range(K)],
        "sim": sim.to_json(),
    }


# ---------------------------------------------------------------- Chrome / Perfetto trace


def timeline_arrows(timeline: Iterable) -> list[Arrow]:
    """Cross-rank data edges: F(s-1,m) end -> F(s,m) start and a backward's (B or I) at s+1
    end -> the one at s start."""
    timed = as_timeline(timeline)
    backward = (Kind.B, Kind.I)
    # a backward is indexed as B whichever it is: the next stage's B or I feeds this one's
    index = {
        (
            Kind.B if t.action.kind in backward else t.action.kind,
            t.action.stage,
            t.action.microbatch,
        ): t
        for t in timed
    }
    arrows = []
    for t in timed:
        kind, s, m = t.action.kind, t.action.stage, t.action.microbatch
        kind = Kind.B if kind in backward else kind
        src = {Kind.F: (Kind.F, s - 1, m), Kind.B: (Kind.B, s + 1, m)}.get(kind)
        src_t = index.get(src) if src else None
        if src_t is not None and src_t.rank != t.rank:
            arrows.append((src_t.rank, src_t.end, t.rank, t.start))
    return arrows


def _metadata(K: int) -> list[dict]:
    """Name one process (with one thread) per rank and keep them in rank order."""
    events = []
    for r in range(K):
        names = {"process_name": f"rank {r}", "thread_name": f"rank {r}"}
        for key, name in names.items():
            events.append({"ph": "M", "name": key, "pid": r, "tid": 0, "args": {"name": name}})
        sort = {"sort_index": r}
        events.append({"ph": "M", "name": "process_sort_index", "pid": r, "tid": 0, "args": sort})
    return events


def _slice(t: Timed, scale: float) -> dict:
    """One complete ("X") event for a compute action."""
    return {
        "ph": "X",
        "name": str(t.action),
        "cat": t.action.kind.value,
        "pid": t.rank,
        "tid": 0,
        "ts": float(t.start * scale),
        "dur": float((t.end - t.start) * scale),
        "args": {"stage": t.action.stage, "microbatch": t.action.microbatch},
    }


def _flow(i: int, arrow: Arrow, scale: float) -> list[dict]:
    """A flow start/finish pair drawing one arrow."""
    src_rank, src_time, dst_rank, dst_time = arrow
    # Viewers bind a flow start to the slice enclosing its ts; nudge 1 ns inside the sender.
    start = {"ph": "s", "id": i, "pid": src_rank, "tid": 0, "ts": float(src_time * scale) - 1e-3}
    finish = {
        "ph": "f",
        "bp": "e",
        "id": i,
        "pid": dst_rank,
        "tid": 0,
        "ts": float(dst_time * scale),
    }
    return [{"name": "p2p", "cat": "comm", **e} for e in (start, finish)]


def to_chrome_trace(
    timeline: Iterable, K: int, arrows: list[Arrow] | None = None, scale: float = 1e6
) -> dict:
    """Chrome trace-event dict; `scale` converts timeline units to microseconds (s -> us)."""
    timed = as_timeline(timeline)
    events = _metadata(K) + [_slice(t, scale) for t in timed]
    for i, arrow in enumerate(arrows or []):
        events += _flow(i, arrow, scale)
    return {"traceEvents": events, "displayTimeUnit": "ms"}


# ---------------------------------------------------------------- PNG


def _import_matplotlib():
    """Import matplotlib's object API lazily: it is an optional extra."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError as exc:
        raise ImportError(
            "to_png needs matplotlib: pip install hpcpipe[plots] (or pip install matplotlib)"
        ) from exc
    return Figure, FigureCanvasAgg, Patch


def _draw_rank(ax, rank: int, timed: list[Timed], inch_per_unit: float) -> None:
    """Bars for one rank's row; gaps stay white so idle time is visible."""
    for t in timed:
        width, label = t.end - t.start, str(t.action)
        colour = COLOURS.get(t.action.kind, "grey")
        ax.barh(rank, width, left=t.start, height=0.8, color=colour, edgecolor="black", lw=0.4)
        # Label only bars wide enough on paper: ~0.6 em per character at 6 pt.
        if width * inch_per_unit >= len(label) * _FONT_PT * 0.6 / 72 + 0.05:
            x = t.start + width / 2
            ax.text(x, rank, label, ha="center", va="center", fontsize=_FONT_PT, color="white")


def to_png(timeline: Iterable, K: int, path, title: str = "", xlabel: str = "time") -> None:
    """Write a rank-per-row timeline chart (F/B/W coloured, idle white) to `path`."""
    Figure, FigureCanvasAgg, Patch = _import_matplotlib()
    timed = as_timeline(timeline)
    t0 = float(min((t.start for t in timed), default=0.0))
    t1 = float(max((t.end for t in timed), default=1.0))
    # Uses the object API, not pyplot, so no global backend or figure state is touched.
    width_in = max(6.0, min(24.0, len(timed) / (2 * K) + 4))
    fig = Figure(figsize=(width_in, 0.5 * K + 1.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    inch_per_unit = 0.8 * width_in / ((t1 - t0) or 1.0)  # axes take ~80% of the width
    for r in range(K):
        _draw_rank(ax, r, [t for t in timed if t.rank == r], inch_per_unit)
    ax.set_yticks(range(K), [f"rank {r}" for r in range(K)])
    ax.set_ylim(K - 0.5, -0.5)  # rank 0 on top, like the text grid
    ax.set_xlim(t0, t1)
    ax.set_xlabel(xlabel)
    ax.set_facecolor("white")
    ax.legend(
        handles=[Patch(color=c, label=k.value) for k, c in COLOURS.items()],
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
    )
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
