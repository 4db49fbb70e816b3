"""Table-driven tests for splitting layers into pipeline stages."""

import itertools
import random

import pytest

from hpcpipe.models.api import layer_costs
from hpcpipe.models.gpt2 import SPEC, GPT2Config
from hpcpipe.pipeline.partition import (
    Partition,
    PartitionError,
    balanced,
    from_counts,
    partition_layers,
)


def brute_force_best(costs, k):
    """Smallest max stage cost over every contiguous split into k non-empty stages."""
    n = len(costs)
    best = float("inf")
    for inner in itertools.combinations(range(1, n), k - 1):
        cuts = (0, *inner, n)
        best = min(best, max(sum(costs[a:b]) for a, b in itertools.pairwise(cuts)))
    return best


def plan(config, k, counts=None, cost="params"):
    """The stages of a GPT-2 model: its layer costs, then partition_layers."""
    return partition_layers(layer_costs(SPEC, config, cost), k, counts)


def check_valid(p: Partition, n: int, k: int):
    """Every layer exactly once, in order, in k non-empty contiguous stages."""
    assert p.num_stages == k
    flat = [i for s in range(k) for i in p.layers(s)]
    assert flat == list(range(n))
    assert all(len(p.layers(s)) >= 1 for s in range(k))
    assert all(p.stage_of_layer(i) == s for s in range(k) for i in p.layers(s))


CASES = [(n, k) for n in range(1, 10) for k in range(1, n + 1)]


@pytest.mark.parametrize("n,k", CASES)
@pytest.mark.parametrize("trial", range(3))
def test_balanced_is_optimal(n, k, trial):
    rng = random.Random(1000 * n + 10 * k + trial)
    # small integers make ties common, which exercises the tie-breaking
    costs = [rng.choice([rng.randint(0, 5), rng.random() * 10]) for _ in range(n)]
    p = balanced(costs, k)
    check_valid(p, n, k)
    assert max(p.stage_costs) == pytest.approx(brute_force_best(costs, k))


@pytest.mark.parametrize(
    "costs,k,bounds",
    [
        ([1, 1, 1, 1], 2, ((0, 2), (2, 4))),
        ([1, 1, 1, 1, 1, 1], 3, ((0, 2), (2, 4), (4, 6))),
        # bottleneck is the 10; the rest is still split evenly
        ([10, 1, 1, 1, 1], 3, ((0, 1), (1, 3), (3, 5))),
        ([1, 1, 1, 1, 10], 3, ((0, 2), (2, 4), (4, 5))),
        ([5], 1, ((0, 1),)),
        ([0, 0, 0], 3, ((0, 1), (1, 2), (2, 3))),
        ([3, 1, 1, 1], 2, ((0, 1), (1, 4))),
    ],
)
def test_balanced_known_answers(costs, k, bounds):
    assert balanced(costs, k).bounds == bounds


def test_balanced_is_deterministic():
    rng = random.Random(7)
    costs = [rng.randint(1, 4) for _ in range(20)]
    assert len({balanced(costs, 5).bounds for _ in range(5)}) == 1


GPT32 = GPT2Config(n_layers=32, d_model=256, n_heads=8, seq_len=128)


@pytest.mark.parametrize("k", [2, 4, 8])
def test_gpt_params_plan_is_balanced(k):
    p = plan(GPT32, k)
    check_valid(p, GPT32.num_layers, k)
    costs = layer_costs(SPEC, GPT32, "params")
    # no split beats the larger of the mean stage and the largest layer
    lower_bound = max(sum(costs) / k, max(costs))
    assert max(p.stage_costs) >= lower_bound
    assert p.imbalance <= 1.05


@pytest.mark.parametrize("k", [2, 3])
def test_gpt_flops_plan_matches_brute_force(k):
    cfg = GPT2Config(n_layers=6, d_model=64, n_heads=4, seq_len=64, vocab_size=2048)
    costs = layer_costs(SPEC, cfg, "flops")
    p = plan(cfg, k, cost="flops")
    assert max(p.stage_costs) == pytest.approx(brute_force_best(costs, k))


@pytest.mark.parametrize("counts", [[1], [2, 3], [1, 1, 1, 1, 1], [4, 1]])
def test_from_counts_round_trip(counts):
    costs = [float(i + 1) for i in range(sum(counts))]
    p = from_counts(counts, costs)
    assert p.counts == counts
    assert from_counts(p.counts, p.costs) == p
    assert p.stage_costs == [sum(costs[a:b]) for a, b in p.bounds]


def test_plan_with_counts():
    cfg = GPT2Config(n_layers=4, d_model=32, n_heads=4, seq_len=8)
    p = plan(cfg, 3, counts=[1, 4, 1])
    assert p.bounds == ((0, 1), (1, 5), (5, 6))
    assert p.costs == tuple(layer_costs(SPEC, cfg))


def test_imbalance_and_describe():
    p = from_counts([1, 3], [6.0, 1.0, 1.0, 1.0])
    assert p.stage_costs == [6.0, 3.0]
    assert p.imbalance == pytest.approx(6.0 / 4.5)
    text = p.describe()
    assert "imbalance 1.333" in text
    assert "1-3 (3)" in text and "66.7%" in text


SMALL = GPT2Config(n_layers=2, d_model=32, n_heads=4, seq_len=8)


@pytest.mark.parametrize(
    "call,match",
    [
        (
            lambda: plan(SMALL, 5),
            r"the model's 4 layers cannot fill 5 stages; use at most 4 stages or more layers",
        ),
        (lambda: balanced([1, 2], 3), "2 layers cannot fill 3 stages; use at most 2"),
        (lambda: balanced([1, 2], 0), "num_stages must be >= 1"),
        (lambda: plan(SMALL, 0), "num_stages must be >= 1"),
        (lambda: balanced([], 1), "no layers"),
        (lambda: balanced([1, -1], 1), r"layers \[1\]"),
        (lambda: plan(SMALL, 2, counts=[2, 3]), r"sum to 5 .* 4 layers; remove 1 layer"),
        (lambda: plan(SMALL, 2, counts=[1, 1]), r"sum to 2 .* 4 layers; add 2 layer"),
        (lambda: plan(SMALL, 2, counts=[4, 0]), "stage 1 has 0"),
        (lambda: plan(SMALL, 3, counts=[5, -1, 0]), "stage 1 has -1, stage 2 has 0"),
        (lambda: plan(SMALL, 3, counts=[2, 2]), "got 2 layer counts for 3 stages"),
        (lambda: from_counts([], [1.0]), "counts is empty"),
        (lambda: Partition(bounds=((0, 2), (3, 4)), costs=(1.0,) * 4), "must start at layer 2"),
        (lambda: Partition(bounds=((0, 2),), costs=(1.0,) * 3), "there are 3 layers"),
        (lambda: from_counts([2], [1.0, 1.0]).stage_of_layer(2), "out of range"),
    ],
)
def test_errors(call, match):
    with pytest.raises((PartitionError, IndexError), match=match):
        call()


def test_partition_error_is_value_error():
    assert issubclass(PartitionError, ValueError)
