"""Cut an ordered list of layers into K contiguous pipeline stages.

The pipeline runs at the pace of its slowest stage, so `balanced` minimises the
largest stage cost exactly. Among the splits that reach that optimum it picks
the evenest one (smallest sum of squared stage costs), then the one whose
boundaries come earliest, so every rank computes the same answer.
"""

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass


class PartitionError(ValueError):
    """A stage layout that cannot work, with a message saying how to fix it."""


@dataclass(frozen=True)
class Partition:
    """Stage s holds layers bounds[s][0] .. bounds[s][1] - 1."""

    bounds: tuple[tuple[int, int], ...]
    costs: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.bounds:
            raise PartitionError("a partition needs at least one stage")
        expected_start = 0
        for s, (start, stop) in enumerate(self.bounds):
            if start != expected_start or stop <= start:
                raise PartitionError(
                    f"stage {s} spans [{start}, {stop}) but must start at layer "
                    f"{expected_start} and hold at least one layer"
                )
            expected_start = stop
        if expected_start != len(self.costs):
            raise PartitionError(
                f"stages cover layers 0..{expected_start - 1} but there are "
                f"{len(self.costs)} layers"
            )

    @property
    def num_stages(self) -> int:
        """Number of pipeline stages."""
        return len(self.bounds)

    @property
    def num_layers(self) -> int:
        """Number of layers over all stages."""
        return len(self.costs)

    @property
    def counts(self) -> list[int]:
        """Layers per stage; `from_counts(p.counts, p.costs)` rebuilds p."""
        return [stop - start for start, stop in self.bounds]

    def layers(self, stage: int) -> range:
        """Global indices of the layers held by `stage`."""
        return range(*self.bounds[stage])

    @property
    def stage_costs(self) -> list[float]:
        """Total cost of each stage."""
        return [math.fsum(self.costs[start:stop]) for start, stop in self.bounds]

    @property
    def imbalance(self) -> float:
        """Max stage cost / mean stage cost; 1.0 is perfect."""
        stage_costs = self.stage_costs
        mean = math.fsum(stage_costs) / len(stage_costs)
        return max(stage_costs) / mean if mean > 0 else 1.0

    def stage_of_layer(self, layer: int) -> int:
        """The stage holding global layer index `layer`."""
        for s, (start, stop) in enumerate(self.bounds):
            if start <= layer < stop:
                return s
        raise IndexError(f"layer {layer} out of range 0..{self.num_layers - 1}")

    def describe(self) -> str:
        """A human-readable table of stages, layers, cost and share of the total."""
        stage_costs = self.stage_costs
        total = math.fsum(stage_costs)
        lines = [f"{'stage':>5}  {'layers':<12} {'cost':>16} {'share':>7}"]
        for s, ((start, stop), cost) in enumerate(zip(self.bounds, stage_costs, strict=True)):
            span = f"{start}-{stop - 1} ({stop - start})"
            share = cost / total if total > 0 else 1.0 / self.num_stages
            lines.append(f"{s:>5}  {span:<12} {_fmt(cost):>16} {share:>7.1%}")
        lines.append(f"imbalance {self.imbalance:.3f} (max / mean stage cost)")
        return "\n".join(lines)


def _fmt(cost: float) -> str:
    """Integers with thousands separators, anything else to 4 significant digits."""
    return f"{cost:,.0f}" if float(cost).is_integer() else f"{cost:.4g}"


def _check_costs(costs: Sequence[float]) -> tuple[float, ...]:
    """Costs as a tuple of finite non-negative floats."""
    costs = tuple(float(c) for c in costs)
    if not costs:
        raise PartitionError("there are no layers to partition")
    bad = [i for i, c in enumerate(costs) if not math.isfinite(c) or c < 0]
    if bad:
        raise PartitionError(f"layer costs must be finite and >= 0; layers {bad} are not")
    return costs


def balanced(costs: Sequence[float], num_stages: int) -> Partition:
    """The contiguous split into num_stages stages with the smallest maximum stage cost."""
    costs = _check_costs(costs)
    n, k = len(costs), num_stages
    if k < 1:
        raise PartitionError(f"num_stages must be >= 1, got {k}")
    if k > n:
        raise PartitionError(
            f"{n} layers cannot fill {k} stages; use at most {n} stages or more layers"
        )
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def seg(i: int, j: int) -> float:
        # every comparison goes through this one expression, so equal splits compare equal
        return prefix[j] - prefix[i]

    best_max = _min_max_cost(seg, n, k)
    cuts = _evenest_cuts(seg, n, k, best_max)
    bounds = tuple(zip(cuts[:-1], cuts[1:], strict=True))
    return Partition(bounds=bounds, costs=costs)


def _min_max_cost(seg, n: int, k: int) -> float:
    """Smallest achievable maximum stage cost (DP over first j layers in s stages)."""
    # worst[j] = best max cost for layers [0, j) in the current number of stages
    worst = [math.inf] * (n + 1)
    for j in range(1, n + 1):
        worst[j] = seg(0, j)
    for s in range(2, k + 1):
        new = [math.inf] * (n + 1)
        # j >= s: each of the s stages needs at least one layer
        for j in range(s, n + 1):
            new[j] = min(max(worst[i], seg(i, j)) for i in range(s - 1, j))
        worst = new
    return worst[n]


def _evenest_cuts(seg, n: int, k: int, limit: float) -> list[int]:
    """Cut points [0, ..., n] with no stage above `limit`, minimising the sum of squares."""
    # sq[s][j] = min sum of squared stage costs for layers [0, j) in s stages; prev for backtrack
    sq = [[math.inf] * (n + 1) for _ in range(k + 1)]
    prev = [[-1] * (n + 1) for _ in range(k + 1)]
    sq[0][0] = 0.0
    for s in range(1, k + 1):
        for j in range(s, n + 1):
            for i in range(s - 1, j):
                c = seg(i, j)
                if c > limit or sq[s - 1][i] == math.inf:
                    continue
                value = sq[s - 1][i] + c * c
                # strict < keeps the earliest cut among exact ties
                if value < sq[s][j]:
                    sq[s][j], prev[s][j] = value, i
    cuts = [n]
    for s in range(k, 0, -1):
        cuts.append(prev[s][cuts[-1]])
    return cuts[::-1]


def from_counts(counts: Sequence[int], costs: Sequence[float]) -> Partition:
    """A partition with an explicit number of layers per stage."""
    costs = _check_costs(costs)
    counts = list(counts)
    if not counts:
        raise PartitionError("counts is empty; give one layer count per stage")
    bad = [(s, c) for s, c in enumerate(counts) if not isinstance(c, numbers.Integral) or c < 1]
    if bad:
        listed = ", ".join(f"stage {s} has {c!r}" for s, c in bad)
        raise PartitionError(f"every stage needs a positive integer layer count; {listed}")
    total, n = sum(counts), len(costs)
    if total != n:
        diff = abs(total - n)
        fix = f"remove {diff} layer(s) from" if total > n else f"add {diff} layer(s) to"
        raise PartitionError(
            f"counts {counts} sum to {total} but the model has {n} layers; {fix} the counts"
        )
    cuts = [0]
    for c in counts:
        cuts.append(cuts[-1] + c)
    return Partition(bounds=tuple(zip(cuts[:-1], cuts[1:], strict=True)), costs=costs)


def partition_layers(
    costs: Sequence[float], num_stages: int, counts: Sequence[int] | None = None
) -> Partition:
    """Cut layers with these costs into num_stages stages: balanced, or as given by `counts`."""
    n = len(costs)
    if num_stages < 1:
        raise PartitionError(f"num_stages must be >= 1, got {num_stages}")
    if num_stages > n:
        raise PartitionError(
            f"the model's {n} layers cannot fill {num_stages} stages; use at most {n} stages "
            "or more layers"
        )
    if counts is None:
        return balanced(costs, num_stages)
    if len(counts) != num_stages:
        raise PartitionError(
            f"got {len(counts)} layer counts for {num_stages} stages; give exactly one "
            "count per stage"
        )
    return from_counts(counts, costs)
