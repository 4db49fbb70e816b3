"""Checkpoint at step 3 on pp=4, resume on other layouts: the run continues as if unbroken.

GPT-2 and Llama (grouped-query attention, tied and untied) alike.
"""

import json

import pytest
from mpirun import run_mpi

LAYOUTS = ["dp1pp4tp1-1f1b", "dp1pp2tp1-gpipe", "dp1pp3tp1-zb-h1", "dp1pp1tp1-1f1b",
           "dp1pp2tp2-1f1b", "dp2pp2tp1-interleaved", "dp2pp1tp2-gpipe"]  # fmt: skip


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    work = tmp_path_factory.mktemp("resume")
    out = work / "results.json"
    proc = run_mpi(4, ["-m", "mpi4py", "tests/mpi/resume_cases.py", str(work), str(out)], 600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("model", ["", "llama-", "llama-tied-"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_resumed_losses_equal_uninterrupted_float64(results, layout, model):
    """GPT-2, and Llama (GQA) untied and tied: saved on pp=4, resumed on every other layout."""
    r = results[f"{model}float64-{layout}"]
    assert len(r["resumed"]) == len(r["reference"]) == 3
    for got, want in zip(r["resumed"], r["reference"], strict=True):
        assert abs(got - want) <= 1e-10 * abs(want)


def test_same_layout_resume_is_bitwise_exact_on_cpu(results):
    r = results["float32-dp1pp4tp1-1f1b"]
    assert r["resumed"] == r["reference"]
    assert r["bitwise_params"]


@pytest.mark.parametrize("model", ["gpt2", "llama-tied"])
def test_zero_checkpoints_reshard_over_dp_zero_pp_tp(results, model):
    """dp 2 -> 4 -> 1 -> 2 -> 1, zero 1 -> 1 -> 0 -> 1 -> 0, pp and tp changing: each leg
    resumes the previous leg's checkpoint, and the losses equal one uninterrupted run."""
    r = results[f"zero-chain-{model}"]
    assert len(r["resumed"]) == len(r["reference"]) == 10
    for got, want in zip(r["resumed"], r["reference"], strict=True):
        assert abs(got - want) <= 1e-10 * abs(want)


@pytest.mark.parametrize("zero", [0, 1])
def test_bf16_checkpoint_holds_fp32_masters_and_resumes_bitwise(results, zero):
    r = results[f"bf16-zero{zero}"]
    assert r["params_bf16"]  # the model computes in bf16...
    assert r["saved_dtypes"] == ["float32"]  # ...but no 16-bit tensor is saved
    assert r["resumed"] == r["reference"]
    assert r["bitwise_params"]


def test_2bw_resumes_exactly_because_the_in_flight_version_is_saved(results):
    """2BW (staleness 1): legs on pp 4, dp 2 + ZeRO, tp 2 and one rank, each resuming the last
    one's checkpoint, equal one uninterrupted run; the same layout continues bitwise; without
    the saved W(t-1) the resumed losses differ."""
    r = results["two-bw"]
    assert len(r["resumed"]) == len(r["reference"]) == 8
    for got, want in zip(r["resumed"], r["reference"], strict=True):
        assert abs(got - want) <= 1e-10 * abs(want)
    assert r["again"] == r["tail"] and r["bitwise_params"]
    assert r["dropped"][0] != r["tail"][0]
