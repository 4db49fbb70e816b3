"""Pipelined training equals single-process training: losses, gradients, parameters (float64).

One mpiexec per world size runs every case (tests/mpi/pipeline_cases.py); each test below
checks one case of that run.
"""

import json

import pytest
from mpirun import run_mpi

TOLERANCE = 1e-10
WORLDS = (1, 2, 4)


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


def case_ids(world):
    return [
        (world, name, M, recompute)
        for name in ("gpipe", "1f1b")
        for M in sorted({1, 3, world, 2 * world + 1})
        for recompute in (False, True)
    ]


ALL = [c for w in WORLDS for c in case_ids(w)]


def find(results, world, name, M, recompute):
    (record,) = [
        r
        for r in results[world]
        if (r["schedule"], r["microbatches"], r["recompute"]) == (name, M, recompute)
    ]
    return record


@pytest.mark.parametrize("world, name, M, recompute", ALL)
def test_equals_single_process(results, world, name, M, recompute):
    r = find(results, world, name, M, recompute)
    assert r["loss_rel"] <= TOLERANCE
    assert r["grad_rel"] <= TOLERANCE
    assert r["norm_rel"] <= TOLERANCE
    assert r["param_rel"] <= TOLERANCE
    assert r["clipped"], "the case must exercise global gradient clipping"


@pytest.mark.parametrize("world, name, M, recompute", ALL)
def test_activation_memory_bound(results, world, name, M, recompute):
    peaks = find(results, world, name, M, recompute)["peak_per_rank"]
    if name == "gpipe":
        assert peaks == [M] * world
    else:
        assert peaks == [min(world - r, M) for r in range(world)]
