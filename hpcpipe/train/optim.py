"""Optimizer pieces shared by pipelined and single-process training: AdamW groups, LR, clipping."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from hpcpipe.config import TrainSection


def lr_at(step: int, train: TrainSection) -> float:
    """Linear warm-up reaching train.lr at step warmup_steps - 1, then cosine decay reaching
    train.min_lr at step train.steps (the last step run, steps - 1, is one decay step short;
    pinned against torch.optim.lr_scheduler in tests/test_optim_oracle.py)."""
    if train.warmup_steps > 0 and step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    span = max(1, train.steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / span)
    return train.min_lr + 0.5 * (train.lr - train.min_lr) * (1 + math.cos(math.pi * progress))


def make_adamw(named_params: Iterable[tuple], train: TrainSection):
    """AdamW with weight decay on matrices only (not biases, LayerNorm or positions), as nanoGPT.

    named_params: (name, parameter), or (name, tensor, decays) for a flat fragment of one.
    AdamW is elementwise, so one optimizer per stage equals one over the whole model.
    """
    decay, no_decay = [], []
    for item in sorted(named_params, key=lambda item: item[0]):
        p = item[1]
        decays = item[2] if len(item) > 2 else p.dim() >= 2
        (decay if decays else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=train.lr, betas=(train.beta1, train.beta2), eps=1e-8)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Apply this step's learning rate to every group."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def grad_square_sum(params: Iterable[torch.nn.Parameter]) -> float:
    """Sum of squared gradient entries, in float64 (the local share of the global norm)."""
    return grad_square_sum_of(p.grad for p in params if p.grad is not None)


def grad_square_sum_of(grads: Iterable[torch.Tensor]) -> float:
    """Sum of squared entries of these gradients, in float64 (inf or nan on an overflow)."""
    total = 0.0
    for g in grads:
        total += float(g.detach().double().pow(2).sum())
    return total


def clip_coefficient(total_norm: float, max_norm: float) -> float:
    """Scale for the gradients, as torch.nn.utils.clip_grad_norm_ computes it."""
    if max_norm <= 0:
        return 1.0
    return min(1.0, max_norm / (total_norm + 1e-6))


def scale_grads(params: Iterable[torch.nn.Parameter], coef: float) -> None:
    """Multiply every gradient by coef (skipped when it is exactly 1)."""
    if coef == 1.0:
        return
    for p in params:
        if p.grad is not None:
            p.grad.mul_(coef)
