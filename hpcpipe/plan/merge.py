"""Several profiles of one machine merged into one: every measured number is the median.

A profile takes about two minutes; on a shared machine whose speed drifts by +-15 % over half
an hour that samples one spell. Profiles taken at intervals over the time the real runs take
(`hpcpipe plan --device A.json,B.json,C.json`, or benchmarks/bench_plan.py, which profiles before
every round) measure the level those runs see. The profiles must be of the same model, dtype,
world size and request (the same rows); identifiers (groups, sizes, tp degrees, kinds) must be
equal, measured numbers are replaced by their median.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from hpcpipe.plan.profile import Profile, load_profile, profile_from_data

# integers that count repetitions (chosen per run from its timings), not identifiers
_COUNTS = {"repeats"}
# per-profile facts about the machine's state, not measurements to agree on
_STATE = {"load_average_start", "load_average_end"}


def load_profiles(paths: Sequence[str]) -> Profile:
    """One profile (as load_profile) or the median of several; ValueError naming the fault."""
    profiles = [load_profile(path) for path in paths]  # each must be valid on its own
    if len(profiles) == 1:
        return profiles[0]
    names = [p.path for p in profiles]
    merged = merge_profiles([p.raw for p in profiles], names)
    return profile_from_data("+".join(names), merged)


def merge_profiles(profiles: Sequence[dict], names: Sequence[str]) -> dict:
    """The median profile; ValueError naming the field where two profiles disagree."""
    if not profiles:
        raise ValueError("merge_profiles needs at least one profile")
    merged = _merge(list(profiles), list(names), "")
    merged["merged_from"] = list(names)
    return merged


def _merge(values: list, names: list[str], where: str):
    first = values[0]
    if isinstance(first, bool) or first is None or isinstance(first, str):
        return _equal(values, names, where)
    if isinstance(first, int) and not _is_count(where):
        return _equal(values, names, where)
    if isinstance(first, (int, float)):
        _same_types(values, names, where, (int, float))
        return statistics.median(float(v) for v in values)
    if isinstance(first, dict):
        _same_types(values, names, where, dict)
        return _merge_dict(values, names, where)
    if isinstance(first, list):
        _same_types(values, names, where, list)
        if where.endswith("contention.sizes"):
            return _merge_by_size(values, names, where)
        _equal([len(v) for v in values], names, f"{where} (its length)")
        return [_merge([v[i] for v in values], names, f"{where}[{i}]") for i in range(len(first))]
    raise ValueError(f"{where}: cannot merge a {type(first).__name__}")


def _merge_dict(values: list[dict], names: list[str], where: str) -> dict:
    keys = list(values[0])
    for value, name in zip(values, names, strict=True):
        if set(value) != set(keys):
            extra = sorted(set(value) ^ set(keys))
            raise ValueError(
                f"profiles {names[0]} and {name} differ at {where or 'the top'}: keys "
                f"{', '.join(extra)} in one only; merge profiles of one model and request"
            )
    out = {}
    for key in keys:
        inner = f"{where}.{key}" if where else key
        column = [v[key] for v in values]
        out[key] = column[0] if key in _STATE else _merge(column, names, inner)
    return out


def _merge_by_size(values: list[list], names: list[str], where: str) -> list[dict]:
    """The contention loop's sizes are chosen per profile from its own table: merge per size."""
    by_size: dict[int, list[tuple[str, dict]]] = {}
    for name, entries in zip(names, values, strict=True):
        for entry in entries:
            by_size.setdefault(int(entry["microbatch_size"]), []).append((name, entry))
    return [
        _merge([e for _, e in group], [n for n, _ in group], f"{where}[size {size}]")
        for size, group in sorted(by_size.items())
    ]


def _is_count(where: str) -> bool:
    return where.rsplit(".", 1)[-1] in _COUNTS


def _equal(values: list, names: list[str], where: str):
    for value, name in zip(values, names, strict=True):
        if value != values[0]:
            raise ValueError(
                f"profiles {names[0]} and {name} differ at {where}: {values[0]!r} vs {value!r}; "
                "merge only profiles of the same model, dtype, world size and request"
            )
    return values[0]


def _same_types(values: list, names: list[str], where: str, kinds) -> None:
    for value, name in zip(values, names, strict=True):
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise ValueError(f"profile {name}: {where} is a {type(value).__name__}")
