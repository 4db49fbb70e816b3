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

from hpcpipe.models.gpt2.model import Block, Embedding, GPTConfig, Head
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
        return _VocabParallelCrossEntropy.apply(logits, targets, start, tp).mean()

    return loss


# --- swapping plain layers for parallel ones ------------------------------------------------


def check_divisible(config: GPTConfig, tp_size: int) -> None:
    """Heads and hidden sizes must split evenly (the vocabulary is padded instead)."""
    hidden = config.mlp_ratio * config.d_model
    for what, value in (("model.n_heads", config.n_heads), ("MLP hidden size", hidden)):
        if value % tp_size:
            raise TensorParallelError(
                f"{what}={value} is not divisible by parallel.tp={tp_size}; choose a tp degree "
                f"that divides it (or change the model)"
            )


def padded_vocab(vocab: int, tp_size: int) -> int:
    """Vocabulary rounded up to a multiple of tp (the extra rows are never used)."""
    return -(-vocab // tp_size) * tp_size


def _swap_linear(linear: nn.Linear, kind, rows=None, cols=None, tp=None) -> nn.Linear:
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


def _parallel_block(block: Block, config: GPTConfig, tp: TPContext) -> dict[str, tuple]:
    """Split attention by heads and the MLP by hidden units; return the shard specs."""
    hd, heads = config.head_dim, config.n_heads
    h0, h1 = tp.block(heads)
    qkv = (h0 * 3 * hd, h1 * 3 * hd)
    attn = (h0 * hd, h1 * hd)
    hidden = tp.block(config.mlp_ratio * config.d_model)
    _swap_linear(block.attn.qkv, ColumnParallelLinear, rows=qkv, tp=tp)
    _swap_linear(block.attn.proj, RowParallelLinear, cols=attn, tp=tp)
    _swap_linear(block.mlp.fc, ColumnParallelLinear, rows=hidden, tp=tp)
    _swap_linear(block.mlp.proj, RowParallelLinear, cols=hidden, tp=tp)
    return {
        "attn.qkv.weight": (0, qkv[0], 3 * config.d_model),
        "attn.qkv.bias": (0, qkv[0], 3 * config.d_model),
        "attn.proj.weight": (1, attn[0], config.d_model),
        "mlp.fc.weight": (0, hidden[0], config.mlp_ratio * config.d_model),
        "mlp.fc.bias": (0, hidden[0], config.mlp_ratio * config.d_model),
        "mlp.proj.weight": (1, hidden[0], config.mlp_ratio * config.d_model),
    }


def _vocab_rows(weight: torch.Tensor, config: GPTConfig, tp: TPContext) -> tuple:
    """This rank's rows of the padded vocabulary matrix, and where they start."""
    start, stop = tp.block(padded_vocab(config.vocab_size, tp.size))
    rows = torch.zeros(stop - start, weight.shape[1], dtype=weight.dtype)
    real = max(0, min(stop, config.vocab_size) - start)
    rows[:real] = weight[start : start + real]
    return rows, start, real


def _parallel_embedding(layer: Embedding, config: GPTConfig, tp: TPContext) -> dict:
    rows, start, _ = _vocab_rows(layer.tok.weight.detach(), config, tp)
    layer.tok = VocabParallelEmbedding(rows, start, tp)
    return {"tok.weight": (0, start, config.vocab_size)}


def _parallel_head(layer: Head, config: GPTConfig, tp: TPContext) -> dict:
    rows, start, real = _vocab_rows(layer.lm_head.weight.detach(), config, tp)
    head = layer.lm_head
    head.weight = nn.Parameter(rows)
    head.__class__ = VocabParallelHead
    head.tp, head.real = tp, real
    head.out_features = rows.shape[0]
    return {"lm_head.weight": (0, start, config.vocab_size)}


def parallelize_stage(stage: nn.Module, config: GPTConfig, tp: TPContext) -> dict[str, tuple]:
    """Swap a Stage's layers for tensor-parallel ones in place.

    Returns {global parameter name: (dim, offset, global size along dim)} for every sharded
    parameter; parameters not listed are replicated on every tp rank.
    """
    check_divisible(config, tp.size)
    specs = {}
    for index, layer in stage.layers.items():
        if isinstance(layer, Block):
            local = _parallel_block(layer, config, tp)
        elif isinstance(layer, Embedding):
            local = _parallel_embedding(layer, config, tp)
        else:
            local = _parallel_head(layer, config, tp)
        specs.update({f"layers.{index}.{name}": spec for name, spec in local.items()})
    # NOTE: when one stage holds both ends of a tied matrix, re-share the sliced Parameter.
    last = str(config.num_layers - 1)
    if config.tie_embeddings and "0" in stage.layers and last in stage.layers:
        stage.layers[last].lm_head.weight = stage.layers["0"].tok.weight
    return specs


def loss_for(config: GPTConfig, tp: TPContext):
    """The loss function the last stage uses with this tp layout."""
    start, _ = tp.block(padded_vocab(config.vocab_size, tp.size))
    return vocab_parallel_loss(tp, start)
