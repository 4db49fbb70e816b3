"""Every layout equals single-process training: losses, gradients, parameters (float64).

One mpiexec per world size runs every case (tests/mpi/pipeline_cases.py); each test below
checks one case of that run. Worlds 1, 2 and 4 run pure pipelines with every schedule; 2, 4
and 8 add data- and tensor-parallel layouts, tied and untied.
"""

import json

import pytest
from mpirun import run_mpi
from pipeline_case_list import bf16_cases, case_id, cases

TOLERANCE = 1e-10
WORLDS = (1, 2, 4, 8)
ALL = [(w, c) for w in WORLDS for c in cases(w)]
PIPELINES = [(w, c) for w, c in ALL if c["layout"] == [1, w, 1]]
BF16 = [(w, c) for w in WORLDS for c in bf16_cases(w)]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """{world: [case records]} from one launch per world size."""
    out = {}
    for world in WORLDS:
        path = tmp_path_factory.mktemp("cases") / f"world{world}.json"
        proc = run_mpi(world, ["-m", "mpi4py", "tests/mpi/pipeline_cases.py", str(path)], 900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        out[world] = json.loads(path.read_text())
    return out


def find(results, world, case):
    keys = ("arch", "schedule", "virtual", "microbatches", "recompute", "layout", "tie", "dtype",
            "zero")  # fmt: skip
    (record,) = [r for r in results[world] if all(r[k] == case[k] for k in keys)]
    return record


@pytest.mark.parametrize("world, case", ALL, ids=[case_id(c) for _, c in ALL])
def test_equals_single_process(results, world, case):
    r = find(results, world, case)
    assert r["loss_rel"] <= TOLERANCE
    assert r["grad_rel"] <= TOLERANCE
    assert r["norm_rel"] <= TOLERANCE
    assert r["param_rel"] <= TOLERANCE
    assert r["clipped"], "the case must exercise global gradient clipping"
    # What the runtime counted is exactly what the schedule's own analysis predicts.
    assert r["peak_per_rank"] == r["schedule_peak_per_rank"]


@pytest.mark.parametrize("world, case", PIPELINES, ids=[case_id(c) for _, c in PIPELINES])
def test_activation_memory_bound(results, world, case):
    M, K = case["microbatches"], world
    peaks = find(results, world, case)["peak_per_rank"]
    if case["schedule"] == "gpipe":
        assert peaks == [M] * K
    elif case["schedule"] == "1f1b":
        assert peaks == [min(K - rank, M) for rank in range(K)]
    elif case["schedule"] == "zb-h1":
        assert max(peaks) == min(K, M)  # 1F1B's peak (its first rank), on every rank
    elif case["schedule"] == "zb-h2":
        assert max(peaks) == min(2 * K - 1, M) and peaks[0] == max(peaks)
    elif case["schedule"] == "zb-auto":  # schedule.memory_limit = 1: 1F1B's peak at most
        assert max(peaks) <= min(K, M)
    elif case["schedule"] == "2bw":  # 1F1B's w_r + 1: the next batch's forwards included
        assert peaks == [K - rank for rank in range(K)]
    elif case["schedule"] == "zb-v":  # chunks of half a stage: 2K of them, 1F1B's peak
        assert max(peaks) <= 2 * min(K, M)
    else:  # interleaved: counted in chunks; Megatron's warm-up bound
        V = case["virtual"]
        R = M // max(1, M // K)
        bounds = [min((V - 1) * R + 2 * (K - 1 - r) + 1, M * V) for r in range(K)]
        if case["schedule"] == "interleaved-zb":  # deferred W's: within the first rank's bound
            bounds = [bounds[0]] * K
        assert all(p <= b for p, b in zip(peaks, bounds, strict=True))


@pytest.mark.parametrize("world, case", BF16, ids=[case_id(c) for _, c in BF16])
def test_bf16_gradients_reduced_in_fp32(results, world, case):
    assert find(results, world, case)["bf16_equal"]
