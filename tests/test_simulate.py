"""Tests for hpcpipe.simulate: cost-model timing, bubbles, memory, deadlocks and fitting."""

import json
from fractions import Fraction

import pytest

from hpcpipe.pipeline.schedule import (
    SCHEDULES,
    Action,
    Kind,
    ScheduleError,
    add_send_recv,
    build_schedule,
    compute_1f1b,
    validate,
)
from hpcpipe.pipeline.simulate import Costs, Timed, fit_costs, predict, simulate

# Fractions keep every time exact, so bubble rates compare with ==.
UNIT = Costs(t_f=Fraction(1), t_b=Fraction(1), t_w=Fraction(0), t_comm=Fraction(0))
GRID = [(K, M) for K in range(1, 9) for M in range(1, 33)]


def A(text: str) -> Action:
    """Shorthand for Action.parse."""
    return Action.parse(text)


def zb_h1(K: int, M: int) -> dict:
    """Hand-built ZB-H1: 1F1B order of F/B, rank r defers each W by r steps (then drains)."""
    out = {}
    for r in range(K):
        warm = min(K - 1 - r, M)
        acts = [Action(r, Kind.F, m) for m in range(warm)]
        pending: list[int] = []
        for i in range(M - warm):
            acts += [Action(r, Kind.F, warm + i), Action(r, Kind.I, i)]
            pending.append(i)
            if len(pending) > r:
                acts.append(Action(r, Kind.W, pending.pop(0)))
        for m in range(M - warm, M):
            pending.append(m)
            acts += [Action(r, Kind.I, m), Action(r, Kind.W, pending.pop(0))]
        out[r] = acts + [Action(r, Kind.W, m) for m in pending]
    return add_send_recv(out, K)


# ---------------------------------------------------------------- bubble rates


def sim_named(name, K, M, V=1, costs=UNIT):
    """Simulate a generator's compute-only schedule (skips build_schedule's validation)."""
    return simulate(SCHEDULES[name](K, M, V), K, M, V, costs)


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
def test_unit_cost_bubble_is_textbook(name):
    # Float unit costs keep every time an exact integer, so == against the rounded fraction.
    for K, M in GRID:
        sim = sim_named(name, K, M, costs=Costs())
        assert sim.bubble_rate == float(Fraction(K - 1, M + K - 1)), (name, K, M)
        assert sim.step_time == 2 * (M + K - 1)


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
def test_unit_cost_bubble_with_fractions(name):
    for K, M in GRID[::5]:
        assert sim_named(name, K, M).bubble_rate == Fraction(K - 1, M + K - 1), (name, K, M)


def test_predict_matches_simulate_of_built_schedule():
    for name in ("gpipe", "1f1b"):
        built = build_schedule(name, 4, 8)
        assert predict(name, 4, 8, 1, UNIT) == simulate(built, 4, 8, 1, UNIT)


@pytest.mark.parametrize("V", [2, 3, 4])
def test_interleaved_gpipe_bubble(V):
    # Breadth-first interleaving never stalls once M >= K, giving (K-1)/(VM+K-1).
    for K in range(1, 9):
        for M in range(K, 33, 4):
            sim = sim_named("gpipe", K, M, V)
            assert sim.bubble_rate == Fraction(K - 1, V * M + K - 1), (K, M, V)


def test_named_interleaved_bubble():
    if "interleaved" not in SCHEDULES:
        pytest.skip("interleaved generator not present")
    for K in range(2, 9):
        for V in (2, 4):
            for M in range(K, 33, K):
                sim = sim_named("interleaved", K, M, V)
                assert sim.bubble_rate == Fraction(K - 1, V * M + K - 1), (K, M, V)


# ---------------------------------------------------------------- costs and comm


def test_comm_adds_two_hops_per_boundary_to_gpipe():
    c = Fraction(1, 4)
    costs = Costs(Fraction(1), Fraction(1), 0, c)
    for K, M in [(1, 4), (2, 3), (4, 8), (8, 16)]:
        sim = predict("gpipe", K, M, 1, costs)
        assert sim.step_time == 2 * (M + K - 1) + 2 * (K - 1) * c


def test_comm_grows_step_time():
    for name in ("gpipe", "1f1b"):
        base = predict(name, 4, 8).step_time
        assert predict(name, 4, 8, 1, Costs(t_comm=0.5)).step_time > base


def test_alpha_beta_comm_replaces_t_comm():
    hop = Costs(t_comm=1.0)
    ab = Costs(t_comm=99.0, latency=0.5, bandwidth=100.0, message_bytes=50.0)
    assert ab.hop() == 1.0
    assert predict("1f1b", 4, 8, 1, ab).step_time == predict("1f1b", 4, 8, 1, hop).step_time


def test_w_folds_into_b_without_w_actions():
    folded = predict("1f1b", 4, 8, 1, Costs(t_f=1, t_b=1, t_w=1))
    merged = predict("1f1b", 4, 8, 1, Costs(t_f=1, t_b=2, t_w=0))
    assert folded.step_time == merged.step_time
    assert [t.end for t in folded.timeline] == [t.end for t in merged.timeline]


def test_chunk_actions_take_a_vth_of_rank_costs():
    sim = predict("gpipe", 2, 4, 2, Costs(t_f=2.0, t_b=4.0))
    for t in sim.timeline:
        assert t.end - t.start == {Kind.F: 1.0, Kind.B: 2.0}[t.action.kind]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1,2,0.5,0.1", Costs(1, 2, 0.5, 0.1)),
        (" 1 , 2 ", Costs(1, 2)),
        ("3", Costs(3)),
    ],
)
def test_costs_parse(text, expected):
    assert Costs.parse(text) == expected


@pytest.mark.parametrize("text", ["", "a,b", "1,2,3,4,5", "1,,2", "-1,1", "nan"])
def test_costs_parse_rejects_bad_text(text):
    with pytest.raises(ValueError, match="T_F,T_B,T_W,T_comm|numbers|>= 0"):
        Costs.parse(text)


# ---------------------------------------------------------------- ZB-H1 and memory


def check_zb_h1_vs_1f1b(zb, K, M):
    """ZB-H1 idles (K-1)(F+B-W) per rank, 1F1B (K-1)(F+B+W), at equal peak activations."""
    costs = Costs(Fraction(1), Fraction(1), Fraction(1), 0)
    z = simulate(zb, K, M, 1, costs)
    o = sim_named("1f1b", K, M, 1, costs)
    assert z.idle == dict.fromkeys(range(K), K - 1), (K, M)
    assert o.idle == dict.fromkeys(range(K), 3 * (K - 1)), (K, M)
    assert max(z.peak_activations.values()) == max(o.peak_activations.values())


def test_hand_built_zb_h1():
    for K in range(1, 9):
        for M in range(K, 33, 5):
            schedule = zb_h1(K, M)
            if M < 10:  # the validator is the slow part; a few sizes prove the order legal
                validate(schedule, K, M)
            check_zb_h1_vs_1f1b(schedule, K, M)


def test_named_zb_h1():
    if "zb-h1" not in SCHEDULES:
        pytest.skip("zb-h1 generator not present")
    for K in range(1, 9):
        for M in range(K, 33, 5):
            check_zb_h1_vs_1f1b(SCHEDULES["zb-h1"](K, M), K, M)


def test_peak_activations_gpipe_and_1f1b():
    for K, M in GRID[::7]:
        assert sim_named("gpipe", K, M).peak_activations == dict.fromkeys(range(K), M)
        expected = {r: min(K - r, M) for r in range(K)}
        assert sim_named("1f1b", K, M).peak_activations == expected


def test_peak_counts_all_chunks_and_holds_until_w():
    # One rank, two chunks: both stages' activations live at once; W extends the hold.
    schedule = {0: [A("0F0"), A("1F0"), A("1B0"), A("0B0"), A("1W0"), A("0W0")]}
    assert simulate(schedule, 1, 1, 2).peak_activations == {0: 2}
    schedule = {0: [A("0F0"), A("0B0"), A("0F1"), A("0W0"), A("0B1"), A("0W1")]}
    assert simulate(schedule, 1, 2, 1, Costs(t_w=1.0)).peak_activations == {0: 2}


# ---------------------------------------------------------------- deadlock and output


def test_deadlock_names_rank_and_action():
    schedule = {0: [A("0B0"), A("0F0")], 1: [A("1F0"), A("1B0")]}
    with pytest.raises(ScheduleError, match=r"rank 0 action 0B0 waits for 1B0 \(rank 1\)"):
        simulate(schedule, 2, 1)


def test_missing_dependency_is_a_deadlock():
    with pytest.raises(ScheduleError, match="rank 1 action 1F0 waits for 0F0"):
        simulate({0: [], 1: [A("1F0"), A("1B0")]}, 2, 1)


def test_comm_actions_take_no_time():
    lowered = build_schedule("1f1b", 4, 6)
    compute = {r: [a for a in acts if a.is_compute] for r, acts in lowered.items()}
    assert simulate(lowered, 4, 6).timeline == simulate(compute, 4, 6).timeline
    assert all(t.action.is_compute for t in simulate(lowered, 4, 6).timeline)


def test_ranks_run_in_list_order_one_at_a_time():
    sim = predict("1f1b", 4, 8, 1, Costs(t_comm=0.3))
    schedule = compute_1f1b(4, 8)
    for r in range(4):
        mine = [t for t in sim.timeline if t.rank == r]
        assert [t.action for t in sorted(mine, key=lambda t: t.start)] == schedule[r]
        assert all(a.end <= b.start for a, b in zip(mine, mine[1:], strict=False))


def test_to_json():
    sim = predict("1f1b", 3, 4, 1, UNIT)
    data = json.loads(json.dumps(sim.to_json()))
    assert data["bubble_rate"] == pytest.approx(2 / 6)
    assert data["step_time"] == 12
    assert data["peak_activations"] == [3, 2, 1]
    assert data["idle"] == [4, 4, 4]
    assert len(data["timeline"]) == 3 * 4 * 2
    assert data["timeline"][0] == {"rank": 0, "action": "0F0", "start": 0.0, "end": 1.0}


# ---------------------------------------------------------------- fitting


def as_events(timeline: list[Timed]) -> list[dict]:
    """A simulated timeline written like a measured trace."""
    return [
        {"rank": t.rank, "action": str(t.action), "start": t.start, "end": t.end} for t in timeline
    ]


def test_fit_costs_recovers_simulated_costs():
    truth = Costs(t_f=2.0, t_b=3.0, t_w=1.0, t_comm=0.5)
    fitted = fit_costs(as_events(simulate(zb_h1(4, 8), 4, 8, 1, truth).timeline))
    assert fitted == truth


def test_fit_costs_folds_w_into_b_and_scales_chunks():
    truth = Costs(t_f=2.0, t_b=3.0, t_w=1.0, t_comm=0.25)
    fitted = fit_costs(as_events(predict("gpipe", 4, 8, 2, truth).timeline), V=2)
    assert fitted == Costs(t_f=2.0, t_b=4.0, t_w=0.0, t_comm=0.25)
    assert predict("gpipe", 4, 8, 2, fitted).step_time == predict("gpipe", 4, 8, 2, truth).step_time


def test_fit_costs_ignores_gaps_where_receiver_was_busy():
    # Rank 1 is busy until 5, long after 0F0 ended at 1: that wait is not comm.
    events = [
        {"rank": 0, "action": "0F0", "start": 0.0, "end": 1.0},
        {"rank": 1, "action": "1W7", "start": 0.0, "end": 5.0},
        {"rank": 1, "action": "1F0", "start": 5.0, "end": 6.0},
        {"rank": 0, "action": "0F1", "start": 1.0, "end": 2.0},
        {"rank": 2, "action": "2F0", "start": 6.5, "end": 7.5},
    ]
    assert fit_costs(events).t_comm == 0.5
    assert fit_costs(events[:4]).t_comm == 0.0
