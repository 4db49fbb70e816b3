"""Tests for hpcpipe.draw: JSON export, Chrome/Perfetto traces and PNG timelines."""

import json
import sys
from collections import Counter

import pytest

from hpcpipe.pipeline import draw
from hpcpipe.pipeline.schedule import build_schedule
from hpcpipe.pipeline.simulate import Costs, predict


def test_to_json_round_trips():
    schedule = build_schedule("1f1b", 3, 4)
    data = json.loads(json.dumps(draw.to_json(schedule, 3, 4, 1, predict("1f1b", 3, 4))))
    assert (data["K"], data["M"], data["V"]) == (3, 4, 1)
    assert data["schedule"][0][:2] == ["0F0", "0SEND_F0"]
    assert len(data["schedule"]) == 3
    assert data["sim"]["peak_activations"] == [3, 2, 1]


@pytest.mark.parametrize(("name", "K", "M", "V"), [("1f1b", 4, 6, 1), ("gpipe", 3, 5, 2)])
def test_timeline_arrows_cover_every_cross_rank_edge(name, K, M, V):
    sim = predict(name, K, M, V, Costs(t_comm=0.5))
    arrows = draw.timeline_arrows(sim.timeline)
    # Each of the K*V-1 stage boundaries carries M forward and M backward messages.
    assert len(arrows) == 2 * (K * V - 1) * M
    for src_rank, src_time, dst_rank, dst_time in arrows:
        assert src_rank != dst_rank
        assert dst_time - src_time >= 0.5


def test_no_arrows_within_a_rank():
    assert draw.timeline_arrows(predict("gpipe", 1, 4, 3).timeline) == []


def test_chrome_trace_rows_slices_and_flows():
    K, M = 4, 6
    sim = predict("1f1b", K, M, 1, Costs(t_comm=0.1))
    arrows = draw.timeline_arrows(sim.timeline)
    trace = json.loads(json.dumps(draw.to_chrome_trace(sim.timeline, K, arrows)))
    events = trace["traceEvents"]
    rows = [e for e in events if e["ph"] == "M" and e["name"] == "process_name"]
    assert sorted((e["pid"], e["args"]["name"]) for e in rows) == [
        (r, f"rank {r}") for r in range(K)
    ]
    slices = [e for e in events if e["ph"] == "X"]
    assert len(slices) == K * M * 2
    assert Counter(e["cat"] for e in slices) == {"F": K * M, "B": K * M}
    first = next(e for e in slices if e["name"] == "0F0")
    assert (first["pid"], first["ts"], first["dur"]) == (0, 0.0, 1e6)
    starts = {e["id"]: e for e in events if e["ph"] == "s"}
    finishes = {e["id"]: e for e in events if e["ph"] == "f"}
    assert len(starts) == len(finishes) == len(arrows) == 2 * (K - 1) * M
    assert starts.keys() == finishes.keys()
    assert all(e["bp"] == "e" for e in finishes.values())
    assert all(starts[i]["ts"] < finishes[i]["ts"] for i in starts)


def test_chrome_trace_accepts_measured_events():
    events = [
        {"rank": 0, "action": "0F0", "start": 0.001, "end": 0.002},
        {"rank": 1, "action": "1F0", "start": 0.0025, "end": 0.004},
        {"rank": 1, "action": "1W0", "start": 0.004, "end": 0.005},
    ]
    trace = draw.to_chrome_trace(events, 2, draw.timeline_arrows(events))
    slices = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert [(e["name"], e["cat"]) for e in slices] == [("0F0", "F"), ("1F0", "F"), ("1W0", "W")]
    assert slices[1]["ts"] == pytest.approx(2500.0)
    assert slices[1]["dur"] == pytest.approx(1500.0)
    assert sum(e["ph"] == "s" for e in trace["traceEvents"]) == 1


def test_chrome_trace_without_arrows_has_no_flows():
    trace = draw.to_chrome_trace(predict("gpipe", 2, 2).timeline, 2)
    assert not any(e["ph"] in "sf" for e in trace["traceEvents"])


def test_png_written(tmp_path):
    pytest.importorskip("matplotlib")
    sim = predict("1f1b", 4, 8, 1, Costs(t_w=0.5, t_comm=0.2))
    path = tmp_path / "timeline.png"
    draw.to_png(sim.timeline, 4, path, title="1f1b K=4 M=8")
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 1000


def test_png_needs_matplotlib(monkeypatch, tmp_path):
    # A None entry in sys.modules makes the import fail, as if matplotlib were absent.
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(ImportError, match=r"pip install hpcpipe\[plots\]"):
        draw.to_png(predict("gpipe", 2, 2).timeline, 2, tmp_path / "x.png")
