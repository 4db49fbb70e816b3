"""ZB-H2 and zb-auto (Qi et al., 2023): split backwards placed to fill the pipeline's bubbles,
checked on the simulator against closed forms and against every handcrafted schedule."""

import functools
import itertools
import json
import subprocess
import sys

import pytest
from test_schedule import interleaved_valid

from hpcpipe.pipeline.autoschedule import HANDCRAFTED, auto_schedule, held_limit, peak
from hpcpipe.pipeline.greedy import list_schedule
from hpcpipe.pipeline.schedule import (
    Kind,
    ScheduleError,
    add_send_recv,
    build_schedule,
    uses_split_backward,
    validate,
)
from hpcpipe.pipeline.simulate import Costs, simulate


def bubble_time(schedule, K: int, M: int, costs: Costs) -> float:
    """The longest rank's span minus the work of one rank: idle time inside it."""
    sim = simulate(schedule, K, M, 1, costs)
    spans = {}
    for t in sim.timeline:
        first, last = spans.get(t.rank, (t.start, t.end))
        spans[t.rank] = (min(first, t.start), max(last, t.end))
    return max(last - first for first, last in spans.values()) - M * (
        costs.t_f + costs.t_b + costs.t_w
    )


@pytest.mark.parametrize("K", range(1, 9))
def test_zb_h2_holds_at_most_twice_1f1bs_peak_less_one(K):
    for M in range(1, 33):
        peaks = validate(build_schedule("zb-h2", K, M), K, M).peak_activations
        assert max(peaks.values()) == min(2 * K - 1, M), (K, M)


def test_zb_h2_warms_up_until_the_first_gradient_is_back():
    schedule = build_schedule("zb-h2", 4, 8)
    for rank in range(4):
        compute = [a for a in schedule[rank] if a.is_compute]
        first_i = next(i for i, a in enumerate(compute) if a.kind == Kind.I)
        assert first_i == 2 * (4 - rank) - 1  # forwards before it: 7, 5, 3, 1


ZB_H2_COSTS = [(1, 1, 1, 0), (1, 1, 1, 0.25), (1, 1.5, 1, 0.5), (2, 2, 1, 0.5), (1, 2, 0.5, 0.25)]


@pytest.mark.parametrize("t_f, t_b, t_w, t_comm", ZB_H2_COSTS)
def test_zb_h2_bubble_equals_its_closed_form(t_f, t_b, t_w, t_comm):
    """(K - 1)(T_F + T_B + 2 T_comm - 2 T_W): the fill and drain that the W's cannot cover."""
    costs = Costs(t_f, t_b, t_w, t_comm)
    for K in (2, 3, 4, 6, 8):
        for M in (2 * K, 3 * K, 4 * K):
            expected = max(0.0, (K - 1) * (t_f + t_b + 2 * t_comm - 2 * t_w))
            got = bubble_time(build_schedule("zb-h2", K, M), K, M, costs)
            assert got == pytest.approx(expected, abs=1e-9), (K, M, costs)


def test_zb_h2_bubble_is_below_zb_h1s_and_1f1bs():
    costs = Costs(1, 1, 1, 0)
    for K in (2, 4, 8):
        M = 2 * K  # room for its deeper warm-up
        rates = [simulate(build_schedule(name, K, M), K, M, 1, costs).bubble_rate
                 for name in ("zb-h2", "zb-h1", "1f1b")]  # fmt: skip
        assert rates[0] < rates[1] < rates[2], (K, M)
        assert rates[0] == pytest.approx(0.0, abs=1e-12)


def test_list_scheduling_keeps_each_rank_under_its_limit():
    for K, M, limit in itertools.product((2, 4, 6), (4, 12), (1, 2, 5)):
        order = list_schedule(K, M, (1.0, 1.3, 0.7, 0.1), limit)
        for actions in order.values():
            held = top = 0
            for kind, _ in actions:
                held += {"F": 1, "I": 0, "W": -1}[kind]
                top = max(top, held)
            assert top <= limit and held == 0
            assert sorted(actions) == sorted((k, m) for k in "FIW" for m in range(M))


COST_GRID = [Costs(1, 1, 1, 0), Costs(1, 2, 1, 0), Costs(1, 1, 0.3, 0.2), Costs(2, 3, 1, 0.5),
             Costs(1, 1.2, 1.5, 0.1), Costs(1, 2, 0, 0)]  # fmt: skip


@pytest.mark.parametrize("costs", COST_GRID, ids=str)
def test_zb_auto_is_never_slower_than_a_handcrafted_schedule_that_fits(costs):
    for K, M, memory_limit in itertools.product((2, 3, 4, 6), (4, 8, 13), (1.0, 1.5, 2.0)):
        limit = held_limit(K, M, memory_limit)
        auto = add_send_recv(auto_schedule(K, M, costs, memory_limit), K)
        validate(auto, K, M)
        assert peak(auto) <= limit
        mine = simulate(auto, K, M, 1, costs).step_time
        for name, generate in HANDCRAFTED.items():
            theirs = add_send_recv(generate(K, M), K)
            if peak(theirs) <= limit:
                step = simulate(theirs, K, M, 1, costs).step_time
                assert mine <= step + 1e-9, (name, K, M, memory_limit, costs)


def test_zb_auto_beats_every_handcrafted_schedule_at_unequal_costs():
    """T_B = 2 T_F and messages that take time: with twice 1F1B's memory the list scheduler's
    order is faster than ZB-H2's (which is built for equal costs) and every other one."""
    costs, K, M = Costs(1, 2, 1, 0.2), 4, 12
    auto = build_schedule("zb-auto", K, M, costs=costs, memory_limit=2.0)
    fastest = simulate(auto, K, M, 1, costs).step_time
    for name, generate in HANDCRAFTED.items():
        schedule = add_send_recv(generate(K, M), K)
        assert fastest < simulate(schedule, K, M, 1, costs).step_time - 1e-9, name


def test_zb_auto_with_twice_the_memory_reaches_zb_h2():
    costs, K, M = Costs(1, 1, 1, 0), 4, 16
    auto = build_schedule("zb-auto", K, M, costs=costs, memory_limit=2.0)
    h2 = build_schedule("zb-h2", K, M)
    assert simulate(auto, K, M, 1, costs).step_time == simulate(h2, K, M, 1, costs).step_time
    assert uses_split_backward(auto)


def test_a_memory_limit_under_one_microbatch_is_refused():
    with pytest.raises(ScheduleError, match="memory_limit of at least 0.25"):
        build_schedule("zb-auto", 4, 8, memory_limit=0.2)
    with pytest.raises(ScheduleError, match="only V=1"):
        build_schedule("zb-auto", 2, 4, 2, memory_limit=2.0)


def test_schedule_command_builds_zb_auto_for_given_costs_and_memory():
    args = ["--schedule", "zb-auto", "--stages", "4", "--microbatches", "12", "--format", "json",
            "--costs", "1,2,1,0.2"]  # fmt: skip
    out = {}
    for limit in ("1", "2"):
        proc = subprocess.run(
            [sys.executable, "-m", "hpcpipe", "schedule", *args, "--memory-limit", limit],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        out[limit] = json.loads(proc.stdout)
    assert max(out["1"]["peak_activations"]) <= 4 < max(out["2"]["peak_activations"]) <= 8
    assert out["2"]["step_time"] < out["1"]["step_time"]
    assert out["1"]["costs"] == [1, 2, 1, 0.2]


# T_F, T_B, T_W, T_comm fitted from traced ZB-H1 runs on this machine (benchmarks/README.md)
FITTED = Costs(70.1, 86.4, 62.1, 0.46)


@functools.cache
def built(name: str, K: int, M: int):
    """(schedule, V, peak in whole stages' activations), built once for every cost."""
    V = 2 if name in ("zb-v", "interleaved", "interleaved-zb") else 1
    schedule = build_schedule(name, K, M, V)
    return schedule, V, max(validate(schedule, K, M, V).peak_activations.values()) / V


def v_and_round_robin(name: str, K: int, M: int, costs: Costs, measure="step_time"):
    """(step time or bubble rate, peak in whole stages' activations) of a schedule."""
    schedule, V, peak_stages = built(name, K, M)
    return getattr(simulate(schedule, K, M, V, costs), measure), peak_stages


V_GRID = list(itertools.product((1, 2, 3, 4, 6, 8), (1, 2, 3, 4, 5, 8, 9, 12, 16, 17, 32)))


@pytest.mark.parametrize("costs", [*COST_GRID, FITTED], ids=str)
def test_zb_v_is_never_slower_than_zb_h1_at_the_same_memory(costs):
    """Both hold 1F1B's peak (K stages' activations). ZB-V crosses 2K - 1 boundaries to ZB-H1's
    K - 1, so when messages take time it needs M >= 2K (its design point) to win: below that,
    with T_comm > 0, it loses (e.g. every M <= K at T_comm = T_F / 5)."""
    for K, M in V_GRID:
        if costs.t_comm > 0 and M < 2 * K:
            continue
        v_time, v_peak = v_and_round_robin("zb-v", K, M, costs)
        h1_time, h1_peak = v_and_round_robin("zb-h1", K, M, costs)
        assert v_peak == h1_peak == min(K, M), (K, M)
        assert v_time <= h1_time + 1e-9, (K, M)


@pytest.mark.parametrize("K", range(2, 9))
def test_zb_v_has_no_more_bubble_than_interleaved_zb_and_less_memory_at_unit_costs(K):
    """The paper's setting (T_F = T_B = T_W, free messages, M >= 2K): ZB-V fills the pipeline
    with 1F1B's memory, where torch's interleaved zero bubble holds more (and interleaved 1F1B
    has a bubble left)."""
    costs = Costs(1, 1, 1, 0)
    for M in [m for m in range(2 * K, 33) if interleaved_valid(K, m)]:
        v_bubble, v_peak = v_and_round_robin("zb-v", K, M, costs, "bubble_rate")
        izb_bubble, izb_peak = v_and_round_robin("interleaved-zb", K, M, costs, "bubble_rate")
        interleaved_bubble, _ = v_and_round_robin("interleaved", K, M, costs, "bubble_rate")
        assert v_bubble == pytest.approx(0.0, abs=1e-12), M
        assert v_bubble <= izb_bubble and v_peak < izb_peak, M
        assert v_bubble < interleaved_bubble, M
