"""Memory per rank, predicted at start-up against measured in training (real MPI ranks).

Predicted: parameter counts with the precision rules, and activations from each stage traced
on fake tensors times the schedule's own hold/release walk. Measured: the tensors the trainer
holds, and the saved tensors autograd really kept (saved_tensors_hooks).
"""

import json

import pytest
from mpirun import run_mpi

WORLDS = (2, 4)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = {}
    for world in WORLDS:
        path = tmp_path_factory.mktemp("memory") / f"world{world}.json"
        proc = run_mpi(world, ["-m", "mpi4py", "tests/mpi/memory_cases.py", str(path)], 600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        out[world] = json.loads(path.read_text())
    return out


def pick(results, world, **keys):
    (case,) = [c for c in results[world] if all(c[k] == v for k, v in keys.items())]
    return case["ranks"]


CASES = [(w, s, r, d) for w in WORLDS for s in ("gpipe", "1f1b", "interleaved", "zb-h1", "2bw")
         for r, d in [("false", "float32")]] + [
    (w, "1f1b", r, d) for w in WORLDS
    for r, d in [("selective", "float32"), ("full", "float32"), ("false", "bfloat16")]
]  # fmt: skip


@pytest.mark.parametrize("world, schedule, recompute, dtype", CASES)
def test_predicted_equals_measured(results, world, schedule, recompute, dtype):
    ranks = pick(results, world, schedule=schedule, recompute=recompute, dtype=dtype,
                 layout=[1, world, 1])  # fmt: skip
    for r in ranks:
        p, m = r["predicted"], r["measured"]
        for kind in ("params", "grads", "optimizer"):
            assert abs(m[kind] - p[kind]) <= 0.05 * p[kind], (r["pp_rank"], kind, p, m)
        assert abs(m["activations"] - p["activations"]) <= 0.10 * p["activations"], (
            r["pp_rank"], p, m)  # fmt: skip


def test_bf16_keeps_fp32_optimizer_state_and_gradients(results):
    for world in WORLDS:
        fp32 = pick(results, world, schedule="1f1b", recompute="false", dtype="float32",
                    layout=[1, world, 1])  # fmt: skip
        bf16 = pick(results, world, schedule="1f1b", recompute="false", dtype="bfloat16",
                    layout=[1, world, 1])  # fmt: skip
        for a, b in zip(fp32, bf16, strict=True):
            assert b["measured"]["params"] * 2 == a["measured"]["params"]  # 16-bit weights
            assert b["measured"]["grads"] == a["measured"]["grads"]  # fp32 gradients
            # fp32 masters + two fp32 moments, against the two moments of a float32 run
            assert b["measured"]["optimizer"] * 2 == a["measured"]["optimizer"] * 3


def test_zero1_optimizer_bytes_are_one_dp_th(results):
    zero0 = pick(results, 4, schedule="1f1b", layout=[2, 2, 1], zero=0)
    zero1 = pick(results, 4, schedule="1f1b", layout=[2, 2, 1], zero=1)
    for a, b in zip(zero0, zero1, strict=True):
        full, shard = a["measured"]["optimizer"], b["measured"]["optimizer"]
        # 1/dp of the state, within the padding of the buckets (a few elements each)
        assert abs(shard - full / 2) <= 64 * 12, (full, shard)
        assert abs(b["predicted"]["optimizer"] - shard) <= 0.05 * shard


def test_recomputation_lowers_measured_activations(results):
    for world in WORLDS:
        by = {r: pick(results, world, schedule="1f1b", recompute=r, dtype="float32",
                      layout=[1, world, 1]) for r in ("false", "selective", "full")}  # fmt: skip
        for none, selective, full in zip(by["false"], by["selective"], by["full"], strict=True):
            n, s, f = (x["measured"]["activations"] for x in (none, selective, full))
            assert s <= n
            if none["pp_rank"] == 0:  # holds K micro-batches; full keeps only their inputs
                assert f < s


def test_2bw_holds_two_more_weight_copies_and_1f1bs_activations(results):
    """PipeDream-2BW: the optimizer's buckets plus two weight versions (3x 1F1B's parameter
    bytes), no extra gradients (the versions' go straight into the buckets), and 1F1B's
    activation peak although the next batch's first forwards are held across the step."""
    for world in WORLDS:
        sync = pick(results, world, schedule="1f1b", recompute="false", dtype="float32",
                    layout=[1, world, 1])  # fmt: skip
        two = pick(results, world, schedule="2bw", recompute="false", dtype="float32",
                   layout=[1, world, 1])  # fmt: skip
        for a, b in zip(sync, two, strict=True):
            assert b["measured"]["params"] == 3 * a["measured"]["params"]
            assert b["measured"]["grads"] == a["measured"]["grads"]
            assert b["measured"]["optimizer"] == a["measured"]["optimizer"]
            assert b["measured"]["activations"] == a["measured"]["activations"]
