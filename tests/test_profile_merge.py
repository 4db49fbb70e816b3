"""Several profiles of one machine read as one: measured numbers by median, identifiers equal."""

import copy
import json
import re
import subprocess
import sys

import pytest
from test_profile_mpi import profile_data

from hpcpipe.plan.machines import ProfileMachine
from hpcpipe.plan.merge import load_profiles, merge_profiles


def scaled(data: dict, factor: float) -> dict:
    """The same profile taken in a spell `factor` times slower: every time scaled."""
    out = copy.deepcopy(data)
    for r in out["layers"]:
        for key in ("f", "b", "w", "bw"):
            r[key] *= factor
    for entry in out["contention"]["sizes"]:
        entry["iteration_s"] = [t * factor for t in entry["iteration_s"]]
    out["p2p"]["latency_s"] *= factor
    out["optimizer"]["seconds_per_param"] *= factor
    return out


@pytest.fixture
def base():
    sizes = [{"microbatch_size": 2, "iteration_s": [6.25, 12.5, 20.0, 25.0]},
             {"microbatch_size": 4, "iteration_s": [12.5, 13.9, 20.8, 25.0]}]  # fmt: skip
    loop = {"speed": [1.0, 0.9, 0.6, 0.5], "sizes": sizes, "group": 1}
    return profile_data(contention=loop)


def write_all(tmp_path, profiles):
    paths = []
    for i, data in enumerate(profiles):
        path = tmp_path / f"p{i}.json"
        path.write_text(json.dumps(data))
        paths.append(str(path))
    return paths


def test_every_measured_time_is_the_median_of_the_profiles(base):
    merged = merge_profiles([scaled(base, 1.0), scaled(base, 1.3), scaled(base, 0.9)], "abc")
    assert merged["layers"][0]["f"] == pytest.approx(base["layers"][0]["f"])  # 0.9, 1, 1.3
    assert merged["contention"]["sizes"][1]["iteration_s"][3] == pytest.approx(25.0)
    assert merged["p2p"]["latency_s"] == pytest.approx(base["p2p"]["latency_s"])
    assert merged["merged_from"] == ["a", "b", "c"]


def test_the_merged_profile_predicts_the_middle_spell_where_one_profile_is_an_outlier(
    base, tmp_path
):
    paths = write_all(tmp_path, [scaled(base, 1.0), scaled(base, 1.02), scaled(base, 0.7)])
    merged = ProfileMachine(load_profiles(paths), {0: 1})
    middle = ProfileMachine(load_profiles(paths[1:2]), {0: 1})
    fast = ProfileMachine(load_profiles(paths[2:]), {0: 1})
    time = lambda m: m.layer_times(None, None, 0, 1, 4, "float32", "false", None).f  # noqa: E731
    assert time(merged) == pytest.approx(time(middle) / 1.02)
    assert time(fast) == pytest.approx(0.7 * time(merged))
    assert merged.speed[:4] == pytest.approx(middle.speed[:4])  # the loop and table scale alike


def test_loop_sizes_that_differ_between_profiles_are_merged_per_size(base):
    other = copy.deepcopy(base)
    other["contention"]["sizes"][0] = {"microbatch_size": 8, "iteration_s": [1, 2, 3, 4]}
    merged = merge_profiles([base, other], ["a", "b"])
    sizes = merged["contention"]["sizes"]
    assert [s["microbatch_size"] for s in sizes] == [2, 4, 8]
    assert sizes[2]["iteration_s"] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    "change, where",
    [
        (lambda d: d.update(dtype="float64"), "dtype"),
        (lambda d: d.update(world_size=2), "world_size"),
        (lambda d: d["layers"][0].update(microbatch_size=3), "layers[0].microbatch_size"),
        (lambda d: d["layers"].pop(), "layers (its length)"),
        (lambda d: d["machine"].update(hostname="other"), "machine.hostname"),
    ],
    ids=["dtype", "world", "row", "rows", "host"],
)
def test_profiles_of_another_model_request_or_machine_are_refused_naming_the_field(
    base, change, where
):
    other = copy.deepcopy(base)
    change(other)
    with pytest.raises(ValueError, match="profiles a and b differ at " + re.escape(where)):
        merge_profiles([base, other], ["a", "b"])


def test_hpcpipe_plan_names_a_missing_profile_among_comma_separated_ones(base, tmp_path):
    paths = write_all(tmp_path, [scaled(base, 1.0), scaled(base, 1.1), scaled(base, 1.2)])
    model = ["--model.n_layers=2", "--model.d_model=64", "--model.n_heads=2",
             "--model.seq_len=16", "--model.vocab_size=32", "--train.global_batch=8"]  # fmt: skip
    cmd = [sys.executable, "-m", "hpcpipe", "plan", "--gpus", "2", "--format", "json", *model]
    missing = subprocess.run(cmd + ["--device", f"{paths[0]},{tmp_path}/none.json"],
                             capture_output=True, text=True)  # fmt: skip
    assert missing.returncode != 0
    assert "none.json" in missing.stderr and "--profile" in missing.stderr
