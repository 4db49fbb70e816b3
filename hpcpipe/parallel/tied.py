"""Tied parameters across pipeline stages, keyed by the model's tie groups.

A tie group names parameters that are one matrix in the single-process model (GPT-2's token
embedding and its head). Where they live on different stages, each stage keeps a copy. All copies
start equal; after each backward their gradients are summed (locally when one rank holds several
copies, over the pipeline ranks holding them otherwise), so identical AdamW updates keep them
equal: the same arithmetic as one shared Parameter. Nothing here knows a model family.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hpcpipe.parallel.p2p import allreduce_


@dataclass
class TiedGroup:
    """One tie group as this rank sees it."""

    key: str
    names: tuple[str, ...]  # global names; the first is the one stored and counted
    copies: list[nn.Parameter]  # this rank's distinct copies (may be empty)
    comm: object | None  # the pp ranks holding copies, or None when one rank holds them all


def holders(names, stage_of_layer, rank_of) -> list[int]:
    """Pipeline ranks holding some member of a group (stage s on rank rank_of(s))."""
    return sorted({rank_of(stage_of_layer(int(n.split(".")[1]))) for n in names})


def build_groups(
    tie_groups: dict, stages: dict, stage_of_layer, grid, placement=None
) -> list[TiedGroup]:
    """Collective over the pp axis: every rank passes the same groups in the same order.

    placement[s]: the pipeline rank of stage s (default round robin). In the V shape the
    first and last stage share rank 0: GPT-2's tied embedding and head are summed locally."""
    params = _named(stages)
    pp = grid.topology.pp
    rank_of = placement.__getitem__ if placement is not None else (lambda s: s % pp)
    out = []
    for key in sorted(tie_groups):
        names = tuple(tie_groups[key])
        ranks = holders(names, stage_of_layer, rank_of)
        comm = grid.split_pp(ranks) if len(ranks) > 1 else None
        found = {id(params[n]): params[n] for n in names if n in params}
        out.append(TiedGroup(key, names, list(found.values()), comm))
    return out


def _named(stages: dict) -> dict[str, nn.Parameter]:
    return {n: p for s in stages.values() for n, p in s.named_parameters(remove_duplicate=False)}


def duplicate_copies(groups: list[TiedGroup], stages: dict) -> set[int]:
    """ids of copies that repeat their group's first member (count each matrix once)."""
    params = _named(stages)
    skip = set()
    for group in groups:
        first = params.get(group.names[0])
        for name in group.names[1:]:
            if name in params and params[name] is not first:
                skip.add(id(params[name]))
    return skip


def canonical_names(groups: list[TiedGroup]) -> dict[str, str]:
    """{member name: the group's first name} for every member but the first."""
    return {name: g.names[0] for g in groups for name in g.names[1:]}


def needs_sum(group: TiedGroup) -> bool:
    """Whether this rank's copies' gradients must be summed (with peers or among themselves)."""
    return bool(group.copies) and (group.comm is not None or len(group.copies) > 1)


def sum_tied_grads(group: TiedGroup, grads: list[torch.Tensor], timeout: float = 300.0) -> float:
    """Make each of `grads` (the copies' accumulated gradients, in the group's copy order) the
    sum over all copies of the group, in place; return seconds spent waiting."""
    if not grads:
        return 0.0
    total = grads[0].clone() if len(grads) > 1 else grads[0]
    for g in grads[1:]:
        total += g
    waited = allreduce_(group.comm, total, timeout=timeout) if group.comm is not None else 0.0
    for g in grads:
        if g is not total:
            g.copy_(total)
    return waited
