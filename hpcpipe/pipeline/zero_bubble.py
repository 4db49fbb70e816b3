"""Split backward for zero-bubble schedules: B computes input gradients, W weight gradients.

Linear layers carry almost all of a transformer's weight-gradient FLOPs, so only their weight
gradients are deferred (as Megatron's zero-bubble implementation does); LayerNorm and embedding
gradients stay in B. Swapping `nn.Linear` for `DeferrableLinear` keeps the same Parameter
objects and names, so optimizers and checkpoints are unaffected.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class WeightGradStore:
    """Where a split backward parks its weight-gradient work until the W action runs it."""

    def __init__(self):
        self.capturing = False
        self.pending: list[Callable[[], None]] = []
        # Told about every parameter a W accumulates into (data parallelism's readiness hook).
        self.on_accumulate: Callable[[nn.Parameter], None] | None = None

    def begin(self) -> None:
        """Start capturing: Linear backwards queue their weight gradients instead."""
        self.capturing, self.pending = True, []

    def end(self) -> list[Callable[[], None]]:
        """Stop capturing; return the queued work (one closure per Linear)."""
        self.capturing = False
        work, self.pending = self.pending, []
        return work


def _accumulate(param: nn.Parameter, grad: torch.Tensor) -> None:
    if param.grad is None:
        param.grad = grad
    else:
        param.grad += grad


def _accumulate_weight_grads(grad_out, x, weight: nn.Parameter, bias: nn.Parameter | None):
    """weight.grad += grad_out^T x (and bias.grad += column sums), in one GEMM pass each.

    NOTE: addmm_ accumulates inside the matrix product (beta = 1) instead of making dW and then
    adding it (Megatron's gradient_accumulation_fusion does the same): one temporary and one
    pass over the gradient less per micro-batch. On the benchmark GPT the W time did not move
    measurably (its GEMMs dominate); on wide layers the saved pass is larger.
    """
    g2 = grad_out.reshape(-1, grad_out.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    if weight.grad is None:
        weight.grad = g2.t().matmul(x2)
    else:
        weight.grad.addmm_(g2.t(), x2)
    if bias is not None:
        _accumulate(bias, g2.sum(0))


class _LinearFn(torch.autograd.Function):
    """y = x W^T + b whose weight gradient can be deferred to a later W action."""

    @staticmethod
    def forward(ctx, x, weight, bias, store):
        ctx.save_for_backward(x, weight)
        ctx.has_bias, ctx.store = bias is not None, store
        ctx.params = (weight, bias)
        # F.linear as nn.Linear: the bias add fused into the GEMM where torch can.
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = grad_out.matmul(weight) if ctx.needs_input_grad[0] else None
        weight_param, bias_param = ctx.params

        def weight_grads():
            g2 = grad_out.reshape(-1, grad_out.shape[-1])
            dw = g2.t().matmul(x.reshape(-1, x.shape[-1]))
            db = g2.sum(0) if ctx.has_bias else None
            return dw, db

        if ctx.store.capturing:
            store = ctx.store

            def deferred():
                with torch.no_grad():  # W runs outside autograd's backward: no graph wanted
                    _accumulate_weight_grads(grad_out, x, weight_param, bias_param)
                if store.on_accumulate is not None:
                    store.on_accumulate(weight_param)
                    if bias_param is not None:
                        store.on_accumulate(bias_param)

            ctx.store.pending.append(deferred)
            return grad_x, None, None, None
        dw, db = weight_grads()
        return grad_x, dw, db, None


class DeferrableLinear(nn.Linear):
    """nn.Linear whose weight gradient may be computed later (see WeightGradStore)."""

    store: WeightGradStore

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _LinearFn.apply(x, self.weight, self.bias, self.store)


def enable_split_backward(module: nn.Module, store: WeightGradStore) -> int:
    """Defer the weight gradients of every Linear inside `module`; return how many.

    Plain nn.Linear becomes a DeferrableLinear; layers that already know how (the
    tensor-parallel ones, `supports_split_backward`) are just given the store.
    """
    count = 0
    for child in module.modules():
        if type(child) is nn.Linear:
            child.__class__ = DeferrableLinear
        elif not getattr(child, "supports_split_backward", False):
            continue
        child.store = store
        count += 1
    return count
