"""Megatron-style tensor parallelism on the tp communicator.

Column-parallel layers split output features, row-parallel layers split input features; the
forward/backward reductions are autograd functions. The plain model is built first (from the
seed, so every layout starts from the same weights), then `parallelize_stage` swaps its layers
for parallel ones holding this tp rank's slice. Parameter names stay the GLOBAL ones; each
sharded parameter records (dim, offset, global size) in `tp_shards` for checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from mpi4py import MPI
from torch import nn

from hpcpipe.models.api import tie_within
from hpcpipe.parallel.p2p import allreduce_


class TensorParallelError(ValueError):
    """A model shape that this tp degree cannot split."""


@dataclass(frozen=True)
class TPContext:
    """The tp communicator and where this rank sits on it."""

    comm: object
    rank: int
    size: int
    timeout: float = 300.0

    def allreduce(self, tensor: torch.Tensor, op=None) -> torch.Tensor:
        """Sum (or op) over tp ranks into a new tensor."""
        out = tensor.detach().contiguous().clone()
        allreduce_(self.comm, out, op, self.timeout)
        return out

    def block(self, total: int) -> tuple[int, int]:
        """[start, stop) of this rank's equal share of `total` items."""
        share = total // self.size
        return self.rank * share, (self.rank + 1) * share


class _CopyToTP(torch.autograd.Function):
    """Identity forward; gradients from every tp rank's branch summed in backward."""

    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.tp.allreduce(grad), None


class _ReduceFromTP(torch.autograd.Function):
    """Sum of the partial results forward; the gradient passes through unchanged."""

    @staticmethod
    def forward(ctx, x, tp):
        return tp.allreduce(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def copy_to_tp(x: torch.Tensor, tp: TPContext) -> torch.Tensor:
    return _CopyToTP.apply(x, tp) if tp.size > 1 else x


def reduce_from_tp(x: torch.Tensor, tp: TPContext) -> torch.Tensor:
    return _ReduceFromTP.apply(x, tp) if tp.size > 1 else x


def _linear(module: nn.Linear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear, or the split-backward version when a zero-bubble schedule asked for it."""
    store = getattr(module, "store", None)
    if store is not None:
        from hpcpipe.pipeline.zero_bubble import _LinearFn

        return _LinearFn.apply(x, module.weight, bias, store)
    return F.linear(x, module.weight, bias)


class ColumnParallelLinear(nn.Linear):
    """Output features split across tp ranks; input replicated."""

    tp: TPContext
    supports_split_backward = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _linear(self, copy_to_tp(x, self.tp), self.bias)


class RowParallelLinear(nn.Linear):
    """Input features split across tp ranks; partial products summed, then the bias added."""

    tp: TPContext
    supports_split_backward = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = reduce_from_tp(_linear(self, x, None), self.tp)
        return out + self.bias if self.bias is not None else out


class VocabParallelEmbedding(nn.Module):
    """Rows [start, stop) of the (padded) vocabulary; other tokens contribute zeros."""

    def __init__(self, weight: torch.Tensor, start: int, tp: TPContext):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.start, self.tp = start, tp

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return reduce_from_tp(out.masked_fill(outside.unsqueeze(-1), 0.0), self.tp)


class VocabParallelHead(nn.Linear):
    """lm_head rows for this rank's vocabulary slice; padding columns get -inf logits."""

    tp: TPContext
    real: int  # real (unpadded) vocabulary entries in this rank's slice
    supports_split_backward = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = _linear(self, copy_to_tp(x, self.tp), None)
        if self.real < logits.shape[-1]:
            logits = logits.masked_fill(self._padding_mask(logits), float("-inf"))
        return logits

    def _padding_mask(self, logits: torch.Tensor) -> torch.Tensor:
        cols = torch.arange(logits.shape[-1], device=logits.device)
        return cols >= self.real


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy over logits split along the vocabulary (Megatron's algorithm)."""

    @staticmethod
    def forward(ctx, logits, target, start, tp):
        logits_max = tp.allreduce(logits.max(dim=-1).values, MPI.MAX)
        shifted = logits - logits_max.unsqueeze(-1)
        local = target - start
        outside = (local < 0) | (local >= logits.shape[-1])
        local = local.masked_fill(outside, 0)
        picked = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        picked = tp.allreduce(picked)
        exp = shifted.exp()
        sum_exp = tp.allreduce(exp.sum(dim=-1))
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), local, outside)
        return sum_exp.log() - picked

    @staticmethod
    def backward(ctx, grad):
        softmax, local, outside = ctx.saved_tensors
        grad_logits = softmax.clone()
        hit = (~outside).to(softmax.dtype)
        grad_logits.scatter_add_(-1, local.unsqueeze(-1), -hit.unsqueeze(-1))
        return grad_logits * grad.unsqueeze(-1), None, None, None


def vocab_parallel_loss(tp: TPContext, start: int):
    """Mean cross-entropy over all tokens from vocabulary-split logits (same on every tp rank)."""

    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if logits.dtype in (torch.bfloat16, torch.float16):
            logits = logits.float()  # as mean_cross_entropy: the softmax in float32
        return _VocabParallelCrossEntropy.apply(logits, targets, start, tp).mean()

    return loss


# --- generic pieces a family's tensor-parallel plan is made of ------------------------------


def require_divisible(what: str, value: int, tp_size: int) -> None:
    """Raise TensorParallelError unless `value` splits evenly over tp ranks."""
    if value % tp_size:
        raise TensorParallelError(
            f"{what}={value} is not divisible by parallel.tp={tp_size}; choose a tp degree "
            f"that divides it (or change the model)"
        )


def padded_vocab(vocab: int, tp_size: int) -> int:
    """Vocabulary rounded up to a multiple of tp (the extra rows are never used)."""
    return -(-vocab // tp_size) * tp_size


def swap_linear(linear: nn.Linear, kind, rows=None, cols=None, tp=None) -> nn.Linear:
    """The same Linear as a parallel class, keeping only the given rows or columns."""
    with torch.no_grad():
        weight = linear.weight
        if rows is not None:
            weight = weight[rows[0] : rows[1]]
        if cols is not None:
            weight = weight[:, cols[0] : cols[1]]
        linear.weight = nn.Parameter(weight.contiguous())
        if linear.bias is not None and rows is not None:
            linear.bias = nn.Parameter(linear.bias[rows[0] : rows[1]].contiguous())
    linear.__class__ = kind
    linear.tp = tp
    linear.out_features, linear.in_features = linear.weight.shape
    return linear


def column_parallel(linear: nn.Linear, rows: tuple[int, int], tp: TPContext, name: str) -> dict:
    """Swap `linear` for its column-parallel slice rows[0]:rows[1]; return its shard specs."""
    total = linear.out_features
    swap_linear(linear, ColumnParallelLinear, rows=rows, tp=tp)
    specs = {f"{name}.weight": (0, rows[0], total)}
    if linear.bias is not None:
        specs[f"{name}.bias"] = (0, rows[0], total)
    return specs


def row_parallel(linear: nn.Linear, cols: tuple[int, int], tp: TPContext, name: str) -> dict:
    """Swap `linear` for its row-parallel slice of input columns; the bias stays replicated."""
    total = linear.in_features
    swap_linear(linear, RowParallelLinear, cols=cols, tp=tp)
    return {f"{name}.weight": (1, cols[0], total)}


def _vocab_rows(weight: torch.Tensor, vocab: int, tp: TPContext) -> tuple:
    """This rank's rows of the padded vocabulary matrix, and where they start."""
    start, stop = tp.block(padded_vocab(vocab, tp.size))
    rows = torch.zeros(stop - start, weight.shape[1], dtype=weight.dtype)
    real = max(0, min(stop, vocab) - start)
    rows[:real] = weight[start : start + real]
    return rows, start, real


def vocab_parallel_embedding(parent: nn.Module, attr: str, tp: TPContext, name: str) -> dict:
    """Replace parent.<attr> (an nn.Embedding) by this rank's rows of the vocabulary."""
    embedding = getattr(parent, attr)
    vocab = embedding.num_embeddings
    rows, start, _ = _vocab_rows(embedding.weight.detach(), vocab, tp)
    setattr(parent, attr, VocabParallelEmbedding(rows, start, tp))
    return {f"{name}.weight": (0, start, vocab)}


def vocab_parallel_head(head: nn.Linear, tp: TPContext, name: str) -> dict:
    """Turn the output projection into this rank's vocabulary slice (padding gets -inf)."""
    vocab = head.out_features
    rows, start, real = _vocab_rows(head.weight.detach(), vocab, tp)
    head.weight = nn.Parameter(rows)
    head.__class__ = VocabParallelHead
    head.tp, head.real = tp, real
    head.out_features = rows.shape[0]
    return {f"{name}.weight": (0, start, vocab)}


def vocab_loss(vocab_size: int, tp: TPContext):
    """The last stage's loss over logits split along a vocabulary of `vocab_size`."""
    start, _ = tp.block(padded_vocab(vocab_size, tp.size))
    return vocab_parallel_loss(tp, start)


def shard_placement(tensor: torch.Tensor, spec) -> tuple[tuple, tuple, tuple]:
    """(global shape, offsets, real local shape) of a local tensor with shard spec (or None).

    The real local shape drops the vocabulary padding rows a rank may hold past the end.
    """
    shape = list(tensor.shape)
    offsets = [0] * tensor.dim()
    if spec is None:
        return tuple(shape), tuple(offsets), tuple(shape)
    dim, offset, size = spec
    local = list(shape)
    local[dim] = max(0, min(shape[dim], size - offset))
    shape[dim], offsets[dim] = size, offset
    return tuple(shape), tuple(offsets), tuple(local)


def require_plan(spec):
    """The family's tensor-parallel plan, or TensorParallelError when it has none."""
    plan = spec.tp_plan()
    if plan is None:
        raise TensorParallelError(
            f"model.arch={spec.name!r} has no tensor-parallel plan; use parallel.tp=1"
        )
    return plan


def parallelize_stage(stage: nn.Module, spec, config, tp: TPContext) -> dict[str, tuple]:
    """Swap a stage's layers for tensor-parallel ones in place, by the family's plan.

    Returns {global parameter name: (dim, offset, global size along dim)} for every sharded
    parameter; parameters not listed are replicated on every tp rank. `spec` is the family's
    ModelSpec (duck-typed: this module imports no model family).
    """
    plan = require_plan(spec)
    plan.check(config, tp.size)
    specs = {}
    for index, layer in stage.layers.items():
        local = plan.parallelize(layer, int(index), config, tp)
        specs.update({f"layers.{index}.{name}": s for name, s in local.items()})
    # NOTE: when one stage holds a whole tie group, re-share the sliced Parameter.
    held = {int(i): layer for i, layer in stage.layers.items()}
    tie_within(spec, config, held)
    return specs
