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
