"""GPT-2's tensor-parallel plan: attention split by heads, the MLP by hidden units (Megatron)."""

from __future__ import annotations

from hpcpipe.models.api import TensorParallelPlan
from hpcpipe.models.gpt2.model import Block, Embedding, GPT2Config
from hpcpipe.parallel.tensor_parallel import (
    TPContext,
    column_parallel,
    require_divisible,
    row_parallel,
    vocab_loss,
    vocab_parallel_embedding,
    vocab_parallel_head,
)


def check(config: GPT2Config, tp_size: int) -> None:
    """Heads and hidden units must split evenly (the vocabulary is padded instead)."""
    require_divisible("model.n_heads", config.n_heads, tp_size)
    require_divisible("MLP hidden size (model.mlp_ratio * d_model)", config.hidden, tp_size)


def parallelize(layer, index: int, config: GPT2Config, tp: TPContext) -> dict[str, tuple]:
    """Swap one layer's modules for this tp rank's slices; return the shard specs."""
    if isinstance(layer, Embedding):
        return vocab_parallel_embedding(layer, "tok", tp, "tok")
    if not isinstance(layer, Block):
        return vocab_parallel_head(layer.lm_head, tp, "lm_head")
    hd = config.head_dim
    h0, h1 = tp.block(config.n_heads)
    hidden = tp.block(config.hidden)
    # qkv rows are grouped per head, so heads h0..h1-1 are one block of rows
    return {
        **column_parallel(layer.attn.qkv, (h0 * 3 * hd, h1 * 3 * hd), tp, "attn.qkv"),
        **row_parallel(layer.attn.proj, (h0 * hd, h1 * hd), tp, "attn.proj"),
        **column_parallel(layer.mlp.fc, hidden, tp, "mlp.fc"),
        **row_parallel(layer.mlp.proj, hidden, tp, "mlp.proj"),
    }


PLAN = TensorParallelPlan(
    check=check,
    parallelize=parallelize,
    loss=lambda config, tp: vocab_loss(config.vocab_size, tp),
)
