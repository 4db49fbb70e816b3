"""Tests for simulate_stages and the worklist simulator: the old sweep's timelines exactly,
per-stage costs, per-boundary hops, and ranks that share CPU cores (processor sharing)."""

import functools
import time
from fractions import Fraction

import pytest

from hpcpipe.pipeline.schedule import (
    SCHEDULES,
    Action,
    Kind,
    ScheduleError,
    build_schedule,
)
from hpcpipe.pipeline.simulate import (
    Costs,
    Timed,
    _boundary_hops,
    _place_in_list_order,
    _stage_work,
    _steps,
    simulate,
    simulate_stages,
    summarize,
)

F = Fraction
GRID_K = (1, 2, 3, 4, 8)
GRID_M = (1, 2, 4, 8, 12)
GRID_V = (1, 2, 3)
# Fractions keep every time exact, so timelines compare with ==; they include t_w = 0 (B and
# W of zb schedules meet at one instant) and comm hops.
EXACT_COSTS = [
    Costs(F(1), F(1), F(0), F(0)),
    Costs(F(2), F(3), F(1), F(1, 2)),
    Costs(F(7, 10), F(13, 10), F(0), F(1, 4)),
    Costs(F(1), F(2), F(1, 3), F(0)),
]
# Floats that round (t_comm = 0.3, V = 3): simulate must still equal the sweep bit for bit.
FLOAT_COSTS = [Costs(1.0, 2.0, 0.5, 0.3), Costs(0.7, 1.3, 0.0, 0.1)]


def A(text: str) -> Action:
    """Shorthand for Action.parse."""
    return Action.parse(text)


def timeline_of(sim) -> list[tuple]:
    """A timeline as (rank, action, start, end) tuples, easy to write by hand."""
    return [(t.rank, str(t.action), t.start, t.end) for t in sim.timeline]


# ---------------------------------------------------------------- the old sweep, as reference
# A verbatim copy of simulate._run before the worklist replaced it (with its helpers), kept
# here so the fast path is checked against the algorithm it replaced, not against itself.


def _sweep_durations(schedule, V, costs):
    computes = [a for acts in schedule.values() for a in acts if a.is_compute]
    with_w = {(a.stage, a.microbatch) for a in computes if a.kind == Kind.W}
    base = {Kind.F: costs.t_f, Kind.B: costs.t_b, Kind.W: costs.t_w}
    dur = {a: base[a.kind] / V for a in computes}
    for a in computes:
        if a.kind == Kind.B and (a.stage, a.microbatch) not in with_w:
            dur[a] = (costs.t_b + costs.t_w) / V
    return dur


def _sweep_dependency(action, num_stages):
    s, m = action.stage, action.microbatch
    if action.kind == Kind.F:
        return Action(s - 1, Kind.F, m) if s > 0 else None
    if action.kind == Kind.B:
        return Action(s + 1, Kind.B, m) if s < num_stages - 1 else Action(s, Kind.F, m)
    return Action(s, Kind.B, m)


def _sweep_ready_time(action, rank, ends, ran_on, K, V, hop):
    """When the action's input is here: its dependency's end, plus a hop from another rank
    (the rank that ran it: round robin or the V shape alike)."""
    dep = _sweep_dependency(action, K * V)
    if dep is None:
        return 0
    if dep not in ends:
        return None
    return ends[dep] + (hop if ran_on[dep] != rank else 0)


def run_sweep(schedule, K, V, costs):
    """The old simulate._run on the schedule as it was written then (a split backward's I as
    the B before its W); the timeline names the actions as given."""
    legacy = {r: [as_legacy(a) for a in acts] for r, acts in schedule.items()}
    given = {(r, as_legacy(a)): a for r, acts in schedule.items() for a in acts}
    timeline = _run_sweep(legacy, K, V, costs)
    return [Timed(t.rank, given[t.rank, t.action], t.start, t.end) for t in timeline]


def as_legacy(action):
    """The action in the notation before torch's I: a split backward's first half as B."""
    if action.kind == Kind.I:
        return Action(action.stage, Kind.B, action.microbatch)
    return action


def _run_sweep(schedule, K, V, costs):
    """The old simulate._run: sweep all ranks until all are done or none can move."""
    dur, hop = _sweep_durations(schedule, V, costs), costs.hop()
    queues = {r: [a for a in schedule.get(r, []) if a.is_compute] for r in range(K)}
    pos, free = dict.fromkeys(queues, 0), dict.fromkeys(queues, 0)
    ends, ran_on = {}, {}
    timeline = []
    while any(pos[r] < len(q) for r, q in queues.items()):
        progressed = False
        for r, queue in queues.items():
            while pos[r] < len(queue):
                a = queue[pos[r]]
                ready = _sweep_ready_time(a, r, ends, ran_on, K, V, hop)
                if ready is None:
                    break
                start = max(free[r], ready)
                free[r] = ends[a] = start + dur[a]
                ran_on[a] = r
                timeline.append(Timed(r, a, start, free[r]))
                pos[r] += 1
                progressed = True
        if not progressed:
            raise ScheduleError("deadlock")
    return sorted(timeline, key=lambda t: (t.start, t.rank))


@functools.cache
def built(name, K, M, V):
    """build_schedule's schedule, or None where it refuses the sizes."""
    try:
        return build_schedule(name, K, M, V)
    except ScheduleError:
        return None


def grid(name):
    """Every (K, M, V, schedule) of the grid that build_schedule accepts for `name`."""
    for K in GRID_K:
        for M in GRID_M:
            for V in GRID_V:
                schedule = built(name, K, M, V)
                if schedule is not None:
                    yield K, M, V, schedule


def equal_stages(costs: Costs, K: int, V: int) -> list[tuple]:
    """Per-stage costs that add up to `costs` on every rank: each chunk a V-th."""
    return [(costs.t_f / V, costs.t_b / V, costs.t_w / V)] * (K * V)


# ---------------------------------------------------------------- same timelines as the sweep


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_equal_stages_give_the_sweeps_result_exactly(name):
    cases = 0
    for K, M, V, schedule in grid(name):
        for costs in EXACT_COSTS:
            expected = summarize(run_sweep(schedule, K, V, costs), K, M, costs)
            stages = equal_stages(costs, K, V)
            assert simulate_stages(schedule, K, M, V, stages, costs.hop()) == expected
            assert simulate(schedule, K, M, V, costs) == expected, (K, M, V, costs)
            cases += 1
    assert cases >= 25  # the grid really ran (names that take V add more)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_simulate_equals_the_sweep_bit_for_bit_with_floats(name):
    for K, M, V, schedule in grid(name):
        for costs in FLOAT_COSTS:
            expected = summarize(run_sweep(schedule, K, V, costs), K, M, costs)
            assert simulate(schedule, K, M, V, costs) == expected, (K, M, V, costs)


def test_worklist_looks_at_each_action_at_most_twice():
    # Once when placed, and at most once before, when its rank parks on its dependency.
    for name, V in (("1f1b", 1), ("interleaved", 2), ("zb-h1", 1), ("gpipe", 3)):
        K, M = 8, 24
        schedule = SCHEDULES[name](K, M, V)
        hops = _boundary_hops(0.5, K * V)
        steps, num_slots = _steps(schedule, K, V, _stage_work([(1, 2, 1)] * (K * V)), hops)
        timeline, looks = _place_in_list_order(steps, num_slots, K, V)
        assert len(timeline) <= looks <= 2 * len(timeline), name


# ---------------------------------------------------------------- unequal stages and hops


def test_unequal_stages_by_hand():
    # GPipe, K=2, M=2; stage 0 costs (F, B, W) = (1, 2, 0), stage 1 (3, 1, 0); hop 0.5.
    #   rank 0: 0F0 [0, 1], 0F1 [1, 2]
    #   rank 1: 1F0 waits for 0F0 + hop: [1.5, 4.5]; 1F1 ready at 2.5, rank busy: [4.5, 7.5]
    #           1B0 (its own F, local) after 1F1: [7.5, 8.5]; 1B1 [8.5, 9.5]
    #   rank 0: 0B0 waits for 1B0 + hop: [9, 11]; 0B1 ready at 10, rank busy: [11, 13]
    # Step 13; rank 0 works 2 * (1 + 2) = 6, rank 1 (the busiest) 2 * (3 + 1) = 8, so the
    # bubble is (13 - 8) / 13: rank 0's extra idle is imbalance, not bubble.
    sim = simulate_stages(build_schedule("gpipe", 2, 2), 2, 2, 1, [(1, 2, 0), (3, 1, 0)], 0.5)
    assert timeline_of(sim) == [
        (0, "0F0", 0, 1),
        (0, "0F1", 1, 2),
        (1, "1F0", 1.5, 4.5),
        (1, "1F1", 4.5, 7.5),
        (1, "1B0", 7.5, 8.5),
        (1, "1B1", 8.5, 9.5),
        (0, "0B0", 9.0, 11.0),
        (0, "0B1", 11.0, 13.0),
    ]
    assert sim.step_time == 13
    assert sim.per_rank_span == {0: 13, 1: 8}
    assert sim.idle == {0: 7, 1: 5}
    assert sim.bubble_rate == (13 - 8) / 13
    assert sim.peak_activations == {0: 2, 1: 2}


def test_each_boundary_has_its_own_hop_both_ways():
    # GPipe K=3, M=1, every stage (1, 1, 0); boundary 0|1 takes 0.5, boundary 1|2 takes 2.
    sim = simulate_stages(build_schedule("gpipe", 3, 1), 3, 1, 1, [(1, 1, 0)] * 3, [0.5, 2.0])
    assert timeline_of(sim) == [
        (0, "0F0", 0, 1),
        (1, "1F0", 1.5, 2.5),
        (2, "2F0", 4.5, 5.5),
        (2, "2B0", 5.5, 6.5),
        (1, "1B0", 8.5, 9.5),
        (0, "0B0", 10.0, 11.0),
    ]


def test_no_hop_between_chunks_of_one_rank():
    # One rank, two chunks: stage 0 -> 1 stays on the rank, so boundary 0|1's hop never applies.
    sim = simulate_stages(build_schedule("gpipe", 1, 1, 2), 1, 1, 2, [(1, 1, 0)] * 2, [5.0])
    assert timeline_of(sim) == [
        (0, "0F0", 0, 1),
        (0, "1F0", 1, 2),
        (0, "1B0", 2, 3),
        (0, "0B0", 3, 4),
    ]


def durations(sim, kind: Kind) -> set:
    """The distinct lengths of one kind's actions on a timeline."""
    return {t.end - t.start for t in sim.timeline if t.action.kind == kind}


def test_a_b_without_its_own_w_does_the_w_work():
    stages = [(1, 2, 0.5)] * 2
    fused = simulate_stages(build_schedule("1f1b", 2, 2), 2, 2, 1, stages, 0)
    split = simulate_stages(build_schedule("zb-h1", 2, 2), 2, 2, 1, stages, 0)
    assert durations(fused, Kind.B) == {2.5}
    assert durations(split, Kind.I) == {2}
    assert durations(split, Kind.W) == {0.5}


def test_bubble_of_equal_stages_is_simulates_bubble():
    costs = Costs(F(1), F(2), F(1, 2), F(1, 4))
    for name, V in (("1f1b", 1), ("interleaved", 2), ("zb-h1", 1)):
        schedule = build_schedule(name, 4, 8, V)
        stages = simulate_stages(schedule, 4, 8, V, equal_stages(costs, 4, V), costs.hop())
        assert stages.bubble_rate == simulate(schedule, 4, 8, V, costs).bubble_rate


def test_deadlock_is_the_same_error_as_simulates():
    schedule = {0: [A("0B0"), A("0F0")], 1: [A("1F0"), A("1B0")]}
    message = r"rank 0 action 0B0 waits for 1B0 \(rank 1\)"
    for speed in (None, [1.0, 0.5]):
        with pytest.raises(ScheduleError, match=message):
            simulate_stages(schedule, 2, 1, 1, [(1, 1, 0)] * 2, 0, speed=speed)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"stage_costs": [(1, 1, 0)]}, "need K\\*V = 2 stage costs"),
        ({"hop": [0.1, 0.2]}, "need K\\*V-1 = 1 boundary hops"),
        ({"procs_per_rank": 0}, "must be >= 1"),
        ({"speed": [1.0, 0.0]}, "speed must be > 0"),
        ({"speed": []}, "at least the rate of one"),
    ],
)
def test_inputs_that_do_not_describe_the_stages_are_refused(kwargs, message):
    args = {"stage_costs": [(1, 1, 0)] * 2, "hop": 0.0, **kwargs}
    with pytest.raises(ValueError, match=message):
        simulate_stages(build_schedule("gpipe", 2, 2), 2, 2, 1, **args)


# ---------------------------------------------------------------- ranks sharing CPU cores

HALF_ON_TWO = [1.0, 0.5]  # 2 processes on 1 core: each runs at half speed when both compute


def gpipe_2x2(stage1=(1, 1, 0), hop=0.0, **kwargs):
    """GPipe K=2, M=2 with stage 0 costing (1, 1, 0)."""
    return simulate_stages(
        build_schedule("gpipe", 2, 2), 2, 2, 1, [(1, 1, 0), stage1], hop, **kwargs
    )


def test_ranks_that_never_compute_together_run_at_full_speed():
    # M=1: each rank only computes while the other waits (their ends and starts touch).
    for hop in (0.0, 0.5):
        schedule = build_schedule("gpipe", 2, 1)
        full = simulate_stages(schedule, 2, 1, 1, [(1, 2, 0), (3, 1, 0)], hop)
        shared = simulate_stages(schedule, 2, 1, 1, [(1, 2, 0), (3, 1, 0)], hop, speed=HALF_ON_TWO)
        assert shared == full


def test_two_ranks_on_one_core_by_hand():
    # Both stages (1, 1, 0), no hop; at full speed the step is 6.
    #   [0, 1]  0F0 alone
    #   [1, 3]  0F1 and 1F0 together at half speed
    #   [3, 4]  1F1 alone (rank 0's 0B0 waits for 1B0); [4, 5] 1B0 alone
    #   [5, 7]  0B0 and 1B1 together at half speed; [7, 8] 0B1 alone
    sim = gpipe_2x2(speed=HALF_ON_TWO)
    assert timeline_of(sim) == [
        (0, "0F0", 0, 1),
        (0, "0F1", 1, 3),
        (1, "1F0", 1, 3),
        (1, "1F1", 3, 4),
        (1, "1B0", 4, 5),
        (0, "0B0", 5, 7),
        (1, "1B1", 5, 7),
        (0, "0B1", 7, 8),
    ]
    assert sim.step_time == 8
    assert sim.bubble_rate == (8 - 4) / 8  # time lost to sharing the core counts as bubble


def test_the_rate_changes_in_the_middle_of_an_action():
    # Stage 1 costs (2, 1, 0). 0F1 and 1F0 start together at 1, at half speed; 0F1 (work 1)
    # ends at 3, when 1F0 has done 1 of its 2; alone again it ends at 4.
    #   [4, 6] 1F1, [6, 7] 1B0 alone; [7, 9] 0B0 and 1B1 together; [9, 10] 0B1 alone.
    sim = gpipe_2x2(stage1=(2, 1, 0), speed=HALF_ON_TWO)
    assert timeline_of(sim) == [
        (0, "0F0", 0, 1),
        (0, "0F1", 1, 3),
        (1, "1F0", 1, 4),
        (1, "1F1", 4, 6),
        (1, "1B0", 6, 7),
        (0, "0B0", 7, 9),
        (1, "1B1", 7, 9),
        (0, "0B1", 9, 10),
    ]


def test_a_rank_waiting_for_a_message_leaves_the_core_to_others():
    # Both stages (1, 1, 0), hop 0.5.
    #   [0, 1] 0F0. 0F1 starts at 1 alone; 1F0's input lands at 1.5, then both run at half
    #   speed: 0F1's last 0.5 takes until 2.5, 1F0 has 0.5 left and finishes alone at 3.
    #   1F1's input (2.5 + 0.5) is there at 3: [3, 4]; 1B0 [4, 5]. 1B1 starts at 5 alone;
    #   0B0's input lands at 5.5: both at half speed until 1B1 ends at 6.5, 0B0 alone to 7.
    #   0B1's input lands at 6.5 + 0.5 = 7: [7, 8].
    sim = gpipe_2x2(hop=0.5, speed=HALF_ON_TWO)
    assert timeline_of(sim) == [
        (0, "0F0", 0, 1),
        (0, "0F1", 1, 2.5),
        (1, "1F0", 1.5, 3),
        (1, "1F1", 3, 4),
        (1, "1B0", 4, 5),
        (1, "1B1", 5, 6.5),
        (0, "0B0", 5.5, 7),
        (0, "0B1", 7, 8),
    ]


def test_each_rank_counts_its_processes():
    # Two processes per rank (tp=2) on two cores: one busy rank (2 processes) runs at full
    # speed, two busy ranks (4 processes) at half: the same timeline as 2 ranks on 1 core.
    two_cores = [1.0, 1.0, 0.5, 0.5]
    tp2 = gpipe_2x2(speed=two_cores, procs_per_rank=2)
    assert timeline_of(tp2) == timeline_of(gpipe_2x2(speed=HALF_ON_TWO))
    # One process per rank on the same two cores never slows down.
    assert gpipe_2x2(speed=two_cores, procs_per_rank=1) == gpipe_2x2()


def test_beyond_the_speed_list_the_cores_are_shared_evenly():
    # Four ranks each run one independent forward (all stage 0, so none waits) of work 1.
    # speed [1, 0.5] says 2 processes share 1 core; 4 busy processes get 0.5 * 2 / 4 each.
    schedule = {r: [A(f"0F{r}")] for r in range(4)}
    sim = simulate_stages(schedule, 4, 4, 1, [(1, 0, 0)] * 4, 0, speed=HALF_ON_TWO)
    assert [t.end for t in sim.timeline] == [4.0] * 4
    # Two ranks of two processes each are four processes too.
    sim = simulate_stages(
        schedule, 2, 4, 2, [(1, 0, 0)] * 4, 0, speed=HALF_ON_TWO, procs_per_rank=2
    )
    assert [t.end for t in sim.timeline[:2]] == [4.0, 4.0]


def test_speed_may_be_a_function_of_busy_processes():
    schedule = {r: [A(f"0F{r}")] for r in range(4)}
    sim = simulate_stages(schedule, 4, 4, 1, [(1, 0, 0)] * 4, 0, speed=lambda n: 1 / n)
    assert [t.end for t in sim.timeline] == [4.0] * 4


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_speed_one_for_everyone_is_full_speed_exactly(name):
    # Times that round in binary: exact equality means no rounding differs from full speed.
    floats = [(0.1, 0.3, 0.2), (0.7, 1.1, 0.0), (0.35, 0.45, 0.15)]
    for K, M, V, schedule in grid(name):
        stages = [floats[s % 3] for s in range(K * V)]
        hops = [0.1 * (1 + s % 2) for s in range(K * V - 1)]
        full = simulate_stages(schedule, K, M, V, stages, hops)
        assert simulate_stages(schedule, K, M, V, stages, hops, speed=[1.0] * K) == full
        exact = equal_stages(EXACT_COSTS[1], K, V)
        full = simulate_stages(schedule, K, M, V, exact, F(1, 3))
        shared = simulate_stages(schedule, K, M, V, exact, F(1, 3), speed=lambda n: 1)
        assert shared == full, (K, M, V)


# ---------------------------------------------------------------- planner sizes (smoke)


@pytest.mark.parametrize(("name", "V"), [("1f1b", 1), ("interleaved", 2), ("zb-h1", 1)])
def test_planner_sizes_run_and_give_the_textbook_bubble(name, V):
    # K=64, M=512: 65k-131k actions. Timings are printed (pytest -s), never asserted.
    K, M = 64, 512
    schedule = SCHEDULES[name](K, M, V)  # the generator: build_schedule's validation is slow
    begin = time.perf_counter()
    sim = simulate_stages(schedule, K, M, V, [(1.0 / V, 1.0 / V, 0.0)] * (K * V), 0.0)
    print(f"\n{name} K={K} M={M} V={V}: {time.perf_counter() - begin:.2f} s")
    assert len(sim.timeline) == sum(len(q) for q in schedule.values())
    if name != "zb-h1":  # zb-h1 with t_w = 0 has its own, smaller bubble
        assert sim.bubble_rate == (K - 1) / (V * M + K - 1)


def test_planner_sizes_under_core_sharing():
    K, M = 64, 512
    schedule = SCHEDULES["1f1b"](K, M, 1)
    stages = [(1.0, 2.0, 0.0)] * K
    begin = time.perf_counter()
    shared = simulate_stages(schedule, K, M, 1, stages, 0.0, speed=lambda n: 1.0)
    print(f"\n1f1b K={K} M={M} processor sharing: {time.perf_counter() - begin:.2f} s")
    assert shared == simulate_stages(schedule, K, M, 1, stages, 0.0)
