"""The machine profile: what `python -m hpcpipe.plan.profile` measures on real MPI ranks, and
how the planner reads a profile back (interpolation, extrapolation, errors)."""

import json

import pytest
from mpirun import run_mpi

from hpcpipe.config import ConfigError, load_config
from hpcpipe.models import get_spec
from hpcpipe.plan.profile import (
    check_request,
    default_microbatch_sizes,
    default_tp_degrees,
    fit_alpha_beta,
    groups_of,
    load_profile,
    repeat_count,
)

# Blocks wide enough that their weight gradients are a third of the backward, so the split's
# input half (B) stays clearly below the whole backward (BW) even on a noisy machine.
TINY = {
    "model.n_layers": "2",
    "model.d_model": "128",
    "model.n_heads": "2",
    "model.seq_len": "32",
    "model.vocab_size": "64",
    "train.global_batch": "4",
}
EMBEDDING, BLOCK, HEAD = 0, 1, 2


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    path = tmp_path_factory.mktemp("profile") / "profile.json"
    keys = [f"--{k}={v}" for k, v in TINY.items()]
    args = ["-m", "hpcpipe.plan.profile", str(path), *keys, "--microbatch-sizes=1,2"]
    proc = run_mpi(2, [*args, "--repeats=2"], timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return load_profile(path)


# --- measured at 2 ranks ----------------------------------------------------------------------


def test_the_profile_names_the_machine_the_run_and_the_model(measured):
    assert {"hostname", "cpu", "cores", "device", "torch", "mpi"} <= set(measured.machine)
    assert measured.machine["device"] == "cpu" and measured.machine["cores"] >= 1
    assert (measured.world_size, measured.threads, measured.dtype) == (2, 1, "float32")
    assert measured.model["arch"] == "gpt2" and measured.model["d_model"] == 128


def test_every_group_is_timed_at_every_tp_degree_and_size_selective_only_with_attention(measured):
    points = {(r["group"], r["tp"], r["microbatch_size"], r["recompute"]) for r in measured.layers}
    for group in (EMBEDDING, BLOCK, HEAD):
        for tp in (1, 2):
            for mbs in (1, 2):
                assert (group, tp, mbs, "false") in points
                assert ((group, tp, mbs, "selective") in points) == (group == BLOCK)


def test_layer_times_are_positive_and_measured_with_the_tp_group_busy(measured):
    for row in measured.layers:
        assert row["f"] > 0 and row["b"] > 0 and row["bw"] > 0 and row["w"] >= 0
        assert row["busy_processes"] == row["tp"]
        assert row["indices"] == {EMBEDDING: [0], BLOCK: [1, 2], HEAD: [3]}[row["group"]]


def test_the_unsplit_backward_costs_more_than_its_input_gradient_half(measured):
    for row in measured.layers:
        if row["group"] == BLOCK and row["tp"] == 1:
            assert row["bw"] > row["b"] and row["w"] > 0


def test_one_busy_process_runs_at_full_speed_and_two_no_faster(measured):
    assert measured.speed(1) == 1.0
    assert len(measured.contention) == 2
    # 1.3: two cores and a noisy neighbour (the whole tiny model loops in well under a ms,
    # and one CI run measured 1.201 with one process slowed by its neighbour)
    assert 0 < measured.speed(2) <= 1.3


def test_the_contention_loop_runs_the_whole_model_at_the_sizes_nearest_its_targets(measured):
    from hpcpipe.plan.profile import CONTENTION_TARGETS_S, contention_sizes, model_f_bw

    loop, raw = measured.raw["contention"], measured.raw
    assert loop["layers"] == "all" and "group" not in loop
    nearest = set()
    for target in CONTENTION_TARGETS_S:
        gaps = {m: abs(model_f_bw(raw, m) - target) for m in raw["microbatch_sizes"]}
        nearest |= {m for m, gap in gaps.items() if gap == min(gaps.values())}
    chosen = [size["microbatch_size"] for size in loop["sizes"]]
    assert chosen == contention_sizes(raw) and set(chosen) <= nearest
    for size in loop["sizes"]:
        assert len(size["iteration_s"]) == 2 and all(t > 0 for t in size["iteration_s"])
        assert size["window_s"] >= 4 * model_f_bw(raw, size["microbatch_size"])


def test_the_loop_sizes_are_those_nearest_each_target_each_once():
    from hpcpipe.plan.profile import contention_sizes

    # one group of one layer, F + BW = 0.05 s per sequence: sizes 1..16 cost 0.05..0.8 s
    sizes = [1, 2, 4, 8, 16]
    layers = [{"group": 0, "tp": 1, "recompute": "false", "microbatch_size": m,
               "f": 0.02 * m, "bw": 0.03 * m} for m in sizes]  # fmt: skip
    profile = {"microbatch_sizes": sizes, "groups": [{"group": 0, "indices": [0]}],
               "layers": layers}  # fmt: skip
    assert contention_sizes(profile) == [2, 4, 8]  # nearest 0.1, 0.25 (0.2) and 0.5 (0.4) s
    profile["microbatch_sizes"] = [1]
    assert contention_sizes(profile) == [1]  # every target nearest the one size


def test_message_and_reduction_times_grow_with_their_size(measured):
    sizes = [8, 1024, 2**16, 2**20, 2**24]
    for times in (
        [measured.p2p_time(n) for n in sizes],
        [measured.p2p_time(n, to_waiting=True) for n in sizes],
        [measured.allreduce_time(2, n) for n in sizes],
        [measured.allreduce_time(2, n, path="allreduce_") for n in sizes],
    ):
        assert times[0] > 0
        assert times == sorted(times) and times[-1] > times[0]
    assert measured.allreduce_time(1, 2**20) == 0.0


def test_the_optimizer_step_and_the_per_step_reductions_cost_time(measured):
    assert measured.optimizer["seconds_per_param"] > 0
    assert measured.optimizer["params"] > 0
    assert measured.optimizer["step_overhead_s"] > 0


def test_groups_of_maps_each_layer_to_the_group_the_profile_measured(measured):
    config = load_config(None, TINY)
    groups = groups_of(get_spec("gpt2"), config)
    assert groups == {0: EMBEDDING, 1: BLOCK, 2: BLOCK, 3: HEAD}
    assert {g["group"]: g["indices"] for g in measured.raw["groups"]} == {
        EMBEDDING: [0],
        BLOCK: [1, 2],
        HEAD: [3],
    }
    deeper = load_config(None, {**TINY, "model.n_layers": "5"})
    assert groups_of(get_spec("gpt2"), deeper.model, measured) == {
        0: EMBEDDING, 1: BLOCK, 2: BLOCK, 3: BLOCK, 4: BLOCK, 5: BLOCK, 6: HEAD
    }  # fmt: skip


def test_a_model_with_layers_the_profile_never_timed_is_refused(measured):
    wider = load_config(None, {**TINY, "model.d_model": "256"})
    with pytest.raises(ValueError, match=r"profile\.json: the profile timed other layers"):
        groups_of(get_spec("gpt2"), wider, measured)


# --- reading a profile back (hand-written files) ----------------------------------------------


def row(group, mbs, f, tp=1, recompute="false"):
    return {"group": group, "tp": tp, "microbatch_size": mbs, "recompute": recompute,
            "f": f, "b": f, "w": f / 2, "bw": 1.5 * f}  # fmt: skip


def profile_data(**changes):
    data = {
        "kind": "hpcpipe-profile",
        "version": 1,
        "machine": {"hostname": "h", "cpu": "c", "cores": 2, "device": "cpu"},
        "world_size": 4,
        "threads": 1,
        "dtype": "float32",
        "model": {"arch": "gpt2"},
        "layers": [
            row(1, 2, 2.5),  # on the line f = 1 + 0.75 m
            row(1, 4, 4.0),
            row(1, 8, 7.0),
            row(0, 4, 1.0),
            row(1, 4, 5.0, recompute="selective"),
        ],  # fmt: skip
        "contention": {"speed": [1.0, 0.9, 0.6, 0.5]},
        "p2p": {"latency_s": 1e-5, "bytes_per_s": 1e9},
        "allreduce": {
            "2": {
                "latency_s": 1e-4,
                "bytes_per_s": 1e9,
                "allreduce_": {"latency_s": 2e-5, "bytes_per_s": 2e9},
            },
            "4": {
                "latency_s": 3e-4,
                "bytes_per_s": 5e8,
                "allreduce_": {"latency_s": 6e-5, "bytes_per_s": 1e9},
            },
        },  # fmt: skip
        "optimizer": {"seconds_per_param": 4e-9, "step_overhead_s": 1e-3},
    }
    data.update(changes)
    return data


@pytest.fixture
def written(tmp_path):
    def write(data, text=None):
        path = tmp_path / "profile.json"
        path.write_text(text if text is not None else json.dumps(data))
        return path

    return write


@pytest.fixture
def profile(written):
    return load_profile(written(profile_data()))


@pytest.mark.parametrize(
    "mbs, f",
    [(2, 2.5), (4, 4.0), (8, 7.0), (6, 5.5), (16, 13.0), (1, 1.75)],
    ids=["measured", "measured", "largest", "between", "beyond", "below"],
)
def test_layer_time_is_a_fixed_part_plus_a_part_per_sequence(profile, mbs, f):
    assert profile.layer_time(1, 1, mbs, "f") == pytest.approx(f)
    assert profile.layer_time(1, 1, mbs, "bw") == pytest.approx(1.5 * f)


def test_one_row_far_off_the_line_barely_moves_what_the_planner_reads(written):
    # six sizes on f = 1 + 3 m, the one at 8 sequences measured 25 % slow (as in one profile)
    sizes = (1, 2, 4, 8, 16, 32)
    rows = [row(1, m, (1 + 3 * m) * (1.25 if m == 8 else 1.0)) for m in sizes]
    profile = load_profile(written(profile_data(layers=rows)))
    for m in sizes:
        assert profile.layer_time(1, 1, m, "f") == pytest.approx(1 + 3 * m, rel=0.03), m


def test_two_sizes_give_the_line_through_both_and_one_a_proportion():
    from hpcpipe.plan.profile import per_sequence_fit

    assert per_sequence_fit([(2, 5.0), (6, 9.0)]) == pytest.approx((3.0, 1.0))
    assert per_sequence_fit([(4, 2.0)]) == pytest.approx((0.0, 0.5))


def test_one_measured_size_scales_in_proportion(profile):
    assert profile.layer_time(0, 1, 8, "w") == pytest.approx(1.0)


def test_selective_rows_are_read_and_a_group_without_them_uses_the_plain_ones(profile):
    assert profile.layer_time(1, 1, 4, "f", recompute="selective") == pytest.approx(5.0)
    assert profile.layer_time(0, 1, 4, "f", recompute="selective") == pytest.approx(1.0)


def test_times_never_go_negative_when_extrapolating_down(written):
    data = profile_data(layers=[row(1, 4, 1.0), row(1, 8, 10.0)])
    assert load_profile(written(data)).layer_time(1, 1, 1, "f") == 0.0


def test_a_tp_degree_or_a_kind_that_was_not_measured_is_refused_by_name(profile):
    with pytest.raises(ValueError, match=r"profile\.json: no layer times for group 1 at tp=2"):
        profile.layer_time(1, 2, 4, "f")
    with pytest.raises(ValueError, match="kind 'x'"):
        profile.layer_time(1, 1, 4, "x")
    with pytest.raises(ValueError, match="recompute 'full'.*f \\+ bw"):
        profile.layer_time(1, 1, 4, "f", recompute="full")


def test_speed_is_measured_up_to_the_world_and_saturates_beyond(profile):
    assert [profile.speed(n) for n in (1, 2, 3, 4)] == [1.0, 0.9, 0.6, 0.5]
    assert profile.speed(8) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        profile.speed(0)


def test_a_message_costs_latency_plus_bytes_over_bandwidth(profile):
    assert profile.p2p_time(0) == pytest.approx(1e-5)
    assert profile.p2p_time(1e6) == pytest.approx(1e-5 + 1e-3)
    # a profile without the messages to a waiting rank: those cost the ping-pong's time
    assert profile.p2p_time(1e6, to_waiting=True) == pytest.approx(1e-5 + 1e-3)


def test_a_message_to_a_waiting_rank_uses_its_own_fit_and_the_planner_charges_it(written):
    from hpcpipe.plan.machines import ProfileMachine

    p2p = {"latency_s": 1e-5, "bytes_per_s": 1e9,
           "to_waiting": {"latency_s": 1e-3, "bytes_per_s": 5e8}}  # fmt: skip
    profile = load_profile(written(profile_data(p2p=p2p)))
    assert profile.p2p_time(1e6) == pytest.approx(1e-5 + 1e-3)
    assert profile.p2p_time(1e6, to_waiting=True) == pytest.approx(1e-3 + 2e-3)
    machine = ProfileMachine(profile, {0: 0})
    assert machine.p2p(1e6, intra=True) == pytest.approx(3e-3)  # a pipeline hop


def test_allreduce_uses_the_group_size_fit_and_scales_unmeasured_sizes_as_a_ring(profile):
    assert profile.allreduce_time(1, 1e9) == 0.0
    assert profile.allreduce_time(2, 1e6) == pytest.approx(1e-4 + 1e-3)
    assert profile.allreduce_time(4, 1e6, path="allreduce_") == pytest.approx(6e-5 + 1e-3)
    # 8 ranks from the 4-rank fit: 7/3 of the latency steps, (7/8)/(3/4) of the bytes term
    assert profile.allreduce_time(8, 1e6) == pytest.approx(3e-4 * 7 / 3 + 2e-3 * 7 / 6)


def test_the_planner_reads_the_machine_and_optimizer_fields(profile):
    assert profile.machine["cores"] == 2 and profile.world_size == 4
    assert profile.optimizer["seconds_per_param"] == 4e-9


@pytest.mark.parametrize(
    "change, message",
    [
        ({"kind": "something-else"}, 'not an hpcpipe profile .*"kind"'),
        ({"version": 2}, "version 2 is not supported"),
        ({"layers": []}, '"layers" must be a non-empty list'),
        ({"layers": [row(1, 4, -1.0)]}, r"layers\[0\]\.f must be a non-negative number"),
        ({"layers": [row(1, 0, 1.0)]}, r"layers\[0\]\.microbatch_size must be an integer >= 1"),
        ({"layers": [row(1, 4, 1.0), row(1, 4, 2.0)]}, "repeat a micro-batch size"),
        ({"contention": {"speed": []}}, "contention.speed must be a non-empty list"),
        ({"p2p": {"latency_s": 1e-5, "bytes_per_s": 0}}, "p2p.bytes_per_s must be a positive"),
        (
            {"p2p": {"latency_s": 1e-5, "bytes_per_s": 1e9, "to_waiting": {"latency_s": 1e-3}}},
            "p2p.to_waiting.bytes_per_s must be a positive",
        ),
        ({"allreduce": {"one": {}}}, "allreduce keys are group sizes"),
        ({"optimizer": {}}, "optimizer.seconds_per_param must be"),
    ],
)
def test_a_file_that_is_not_a_valid_profile_is_refused_naming_it_and_the_fault(
    written, change, message
):
    path = written(profile_data(**change))
    with pytest.raises(ValueError, match=message) as error:
        load_profile(path)
    assert str(path) in str(error.value)


def test_a_profile_missing_a_section_says_which(written):
    data = profile_data()
    del data["p2p"], data["optimizer"]
    with pytest.raises(ValueError, match="lacks p2p, optimizer"):
        load_profile(written(data))


def test_text_that_is_not_json_or_no_file_at_all_is_refused_by_name(written, tmp_path):
    with pytest.raises(ValueError, match=r"profile\.json: not an hpcpipe profile \(not JSON"):
        load_profile(written(None, text="step,loss\n1,2.5\n"))
    with pytest.raises(ValueError, match=r"missing\.json: no such profile"):
        load_profile(tmp_path / "missing.json")


def test_the_alpha_beta_fit_recovers_latency_and_bandwidth():
    points = [(n, 2e-5 + n / 4e9) for n in (8, 2**16, 2**20, 2**24)]
    fit = fit_alpha_beta(points)
    assert fit["latency_s"] == pytest.approx(2e-5, rel=1e-6)
    assert fit["bytes_per_s"] == pytest.approx(4e9, rel=1e-6)


def test_the_alpha_beta_fit_stays_positive_on_noisy_points():
    fit = fit_alpha_beta([(8, 5e-5), (2**16, 1e-5), (2**20, 2e-4)])
    assert fit["latency_s"] >= 0 and fit["bytes_per_s"] > 0
    falling = fit_alpha_beta([(8, 3e-4), (2**20, 1e-4)])
    assert falling["latency_s"] >= 0 and falling["bytes_per_s"] > 0


@pytest.mark.parametrize(
    "iteration_s, repeats, count",
    [(0.1, 5, 5), (0.5, 5, 3), (0.2, 5, 5), (2.0, 5, 3), (0.001, 5, 15), (0.02, 5, 12),
     (0.001, 2, 6), (2.0, 2, 2)],
    ids=["as-asked", "slow", "at-budget", "very-slow", "fast", "quarter-second", "fast-few",
         "slow-few"],
)  # fmt: skip
def test_slow_points_are_timed_fewer_times_and_very_fast_ones_more(iteration_s, repeats, count):
    assert repeat_count(iteration_s, repeats) == count


def test_by_default_every_micro_batch_size_and_every_tp_degree_the_model_splits_into():
    config = load_config(None, {**TINY, "train.global_batch": "12"})
    assert default_microbatch_sizes(config) == [1, 2, 3, 4, 6, 12]
    assert default_tp_degrees(get_spec("gpt2"), config.model, 4) == [1, 2]  # 2 heads


def test_what_cannot_be_profiled_is_refused_before_any_communication():
    config = load_config(None, TINY)
    with pytest.raises(ConfigError, match="at least 2 ranks"):
        check_request(config, 1, [1], [1], 5)
    with pytest.raises(ConfigError, match="cannot be split tp=3 ways"):
        check_request(config, 4, [1], [3], 5)
    with pytest.raises(ConfigError, match="tp degree 8 needs 1..4 ranks"):
        check_request(config, 4, [1], [8], 5)
    with pytest.raises(ConfigError, match="micro-batch sizes must be >= 1"):
        check_request(config, 4, [0, 2], [1], 5)


def test_the_planner_anchors_the_layer_table_to_the_contention_loop(written):
    from hpcpipe.plan.machines import ProfileMachine

    # the table says block F + BW at 4 sequences = 4 + 6 = 10 s; the loop measured 12.5 s
    # alone and 25 s with all four busy: a fully loaded step must take what the loop took
    loop = {"speed": [1.0, 0.9, 0.6, 0.5], "iteration_s": [12.5, 13.9, 20.8, 25.0],
            "group": 1, "microbatch_size": 4}  # fmt: skip
    machine = ProfileMachine(load_profile(written(profile_data(contention=loop))), {})
    assert machine.speed[0] == pytest.approx(10 / 12.5)
    assert 10 / machine.speed[3] == pytest.approx(25.0)
    # a loop over the whole model: the table's F + BW of every layer (groups 0 and 1: one
    # embedding, 1 + 1.5 = 2.5 s at 4 sequences; two blocks, 2 x 10 s) over the loop's time
    groups = [{"group": 0, "indices": [0]}, {"group": 1, "indices": [1, 2]}]
    whole = {"speed": [1.0, 0.9, 0.6, 0.5], "iteration_s": [18.0, 20.0, 30.0, 36.0],
             "layers": "all", "microbatch_size": 4}  # fmt: skip
    data = profile_data(contention=whole, groups=groups)
    machine = ProfileMachine(load_profile(written(data)), {})
    assert machine.speed[0] == pytest.approx(22.5 / 18.0)
    assert 22.5 / machine.speed[3] == pytest.approx(36.0)
    older = ProfileMachine(load_profile(written(profile_data())), {})
    assert older.speed[:4] == [1.0, 0.9, 0.6, 0.5]  # no loop times: the table as it is
    # the loop at three sizes: each size's table over its seconds, median per count (the
    # table at 2, 4, 8 sequences: F + BW = 2.5 + 3.75, 4 + 6, 7 + 10.5 s for the block)
    sizes = [{"microbatch_size": 2, "iteration_s": [6.25, 12.5, 20.0, 25.0]},
             {"microbatch_size": 4, "iteration_s": [12.5, 13.9, 20.8, 25.0]},
             {"microbatch_size": 8, "iteration_s": [17.5, 19.0, 29.0, 43.75]}]  # fmt: skip
    loop = {"speed": [1.0, 0.9, 0.6, 0.5], "sizes": sizes, "group": 1}
    machine = ProfileMachine(load_profile(written(profile_data(contention=loop))), {})
    assert machine.speed[0] == pytest.approx(1.0)  # 1.0, 0.8, 1.0
    assert machine.speed[1] == pytest.approx(10 / 13.9)  # 0.5, 0.719, 0.921
    assert machine.speed[3] == pytest.approx(0.4)  # 0.25, 0.4, 0.4: one size off the others
    assert machine.speed[7] == pytest.approx(0.4 * 4 / 8)  # beyond 4 busy: saturated


def test_the_split_backward_halves_sum_to_the_unsplit_backward_in_their_measured_shares(written):
    from hpcpipe.plan.machines import ProfileMachine

    # measured: b = 6, w = 3 (sum 9) but bw = 6: the planner keeps bw and the 2 : 1 shares
    noisy = {**row(1, 4, 4.0), "b": 6.0, "w": 3.0, "bw": 6.0}
    machine = ProfileMachine(load_profile(written(profile_data(layers=[noisy]))), {0: 1})
    times = machine.layer_times(None, None, 0, 1, 4, "float32", "false", None)
    assert (times.f, times.b, times.w, times.bw) == pytest.approx((4.0, 4.0, 2.0, 6.0))
