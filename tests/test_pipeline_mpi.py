"""Pipelined training equals single-process training: losses, gradients, parameters (float64).

One mpiexec per world size runs every case (tests/mpi/pipeline_cases.py); each test below
checks one case of that run.
"""

import json

import pytest
from mpirun import run_mpi
from pipeline_case_list import cases

TOLERANCE = 1e-10
WORLDS = (1, 2, 4)
ALL = [(world, case) for world in WORLDS for case in cases(world)]
IDS = [
    f"K{w}-{c['schedule']}-V{c['virtual']}-M{c['microbatches']}{'-recompute' * c['recompute']}"
    for w, c in ALL
]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """{world: [case records]} from one launch per world size."""
    out = {}
    for world in WORLDS:
        path = tmp_path_factory.mktemp("cases") / f"world{world}.json"
        proc = run_mpi(world, ["-m", "mpi4py", "tests/mpi/pipeline_cases.py", str(path)], 600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        out[world] = json.loads(path.read_text())
    return out


def find(results, world, case):
    keys = ("schedule", "virtual", "microbatches", "recompute")
    (record,) = [r for r in results[world] if all(r[k] == case[k] for k in keys)]
    return record


@pytest.mark.parametrize("world, case", ALL, ids=IDS)
def test_equals_single_process(results, world, case):
    r = find(results, world, case)
    assert r["loss_rel"] <= TOLERANCE
    assert r["grad_rel"] <= TOLERANCE
    assert r["norm_rel"] <= TOLERANCE
    assert r["param_rel"] <= TOLERANCE
    assert r["clipped"], "the case must exercise global gradient clipping"


@pytest.mark.parametrize("world, case", ALL, ids=IDS)
def test_activation_memory_bound(results, world, case):
    r = find(results, world, case)
    M, K = case["microbatches"], world
    peaks = r["peak_per_rank"]
    # What the runtime counted is exactly what the schedule's own analysis predicts...
    assert peaks == r["schedule_peak_per_rank"]
    # ...and within each schedule's documented bound.
    if case["schedule"] == "gpipe":
        assert peaks == [M] * K
    elif case["schedule"] == "1f1b":
        assert peaks == [min(K - rank, M) for rank in range(K)]
    elif case["schedule"] == "zb-h1":
        assert max(peaks) == min(K, M)  # 1F1B's peak (its first rank), on every rank
    else:  # interleaved: counted in chunks; Megatron's warm-up bound
        V = case["virtual"]
        R = M // max(1, M // K)
        assert all(p <= min((V - 1) * R + 2 * (K - 1 - r) + 1, M * V) for r, p in enumerate(peaks))
