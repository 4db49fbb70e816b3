"""Tied input/output embeddings across pipeline stages.

The embedding (first stage) and the head (last stage) each keep a copy of the tied matrix. Both
start equal; after each backward their gradients are summed (locally when one rank holds both
as separate copies, over the pipeline's first/last ranks otherwise), so identical AdamW updates
keep them equal: the same arithmetic as one shared Parameter in the single-process model.
"""

from __future__ import annotations

import torch
from torch import nn

from hpcpipe.parallel.p2p import allreduce_


def tied_copies(stages: dict[int, nn.Module], num_layers: int) -> list[nn.Parameter]:
    """This rank's distinct copies of the tied matrix (tok.weight and/or lm_head.weight)."""
    suffixes = ("layers.0.tok.weight", f"layers.{num_layers - 1}.lm_head.weight")
    found: dict[int, nn.Parameter] = {}
    for stage in stages.values():
        for name, param in stage.named_parameters(remove_duplicate=False):
            if name in suffixes:
                found[id(param)] = param
    return list(found.values())


def separate_head_copy(stages: dict[int, nn.Module], num_layers: int) -> set[int]:
    """id of the head's copy when it is a Parameter of its own (count the matrix only once)."""
    name = f"layers.{num_layers - 1}.lm_head.weight"
    embedding = "layers.0.tok.weight"
    params = {n: p for s in stages.values() for n, p in s.named_parameters(remove_duplicate=False)}
    if name in params and (embedding not in params or params[embedding] is not params[name]):
        return {id(params[name])}
    return set()


def sum_tied_grads(copies: list[nn.Parameter], comm, timeout: float = 300.0) -> float:
    """Make every copy's gradient the sum over all copies; return seconds spent waiting."""
    if not copies:
        return 0.0
    total = torch.zeros_like(copies[0])
    for param in copies:
        if param.grad is not None:
            total += param.grad
    waited = allreduce_(comm, total, timeout=timeout) if comm is not None else 0.0
    for param in copies:
        param.grad = total.clone() if len(copies) > 1 else total
    return waited
