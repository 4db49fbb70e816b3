"""Llama's tensor-parallel plan: attention split by key/value group, the MLP by hidden units."""

from __future__ import annotations

from hpcpipe.models.api import TensorParallelPlan
from hpcpipe.models.llama.model import Block, Embedding, LlamaConfig
from hpcpipe.parallel.tensor_parallel import (
    TensorParallelError,
    TPContext,
    column_parallel,
    require_divisible,
    row_parallel,
    vocab_loss,
    vocab_parallel_embedding,
    vocab_parallel_head,
)


def check(config: LlamaConfig, tp_size: int) -> None:
    """Key/value heads and hidden units must split evenly (the vocabulary is padded instead)."""
    kv = config.kv_heads
    if kv % tp_size:
        # every query head must sit with its key/value head, so the kv heads bound the tp degree
        given = f"model.n_kv_heads={config.n_kv_heads}" + (
            "" if config.n_kv_heads else " = n_heads"
        )
        raise TensorParallelError(
            f"{kv} key/value heads ({given}) are not divisible by parallel.tp={tp_size}; each "
            "tp rank holds whole key/value groups with the query heads they serve, so choose a "
            f"tp degree dividing {kv} (or change model.n_kv_heads)"
        )
    require_divisible(
        "MLP hidden size (model.ffn_hidden or its derived value)", config.hidden, tp_size
    )


def parallelize(layer, index: int, config: LlamaConfig, tp: TPContext) -> dict[str, tuple]:
    """Swap one layer's modules for this tp rank's slices; return the shard specs."""
    if isinstance(layer, Embedding):
        return vocab_parallel_embedding(layer, "tok", tp, "tok")
    if not isinstance(layer, Block):
        return vocab_parallel_head(layer.lm_head, tp, "lm_head")
    hd = config.head_dim
    g0, g1 = tp.block(config.kv_heads)
    rep = config.n_heads // config.kv_heads
    # the query heads groups g0..g1-1 serve are one contiguous block of wq rows (HF layout)
    q = (g0 * rep * hd, g1 * rep * hd)
    kv = (g0 * hd, g1 * hd)
    hidden = tp.block(config.hidden)
    attn, mlp = layer.attn, layer.mlp
    return {
        **column_parallel(attn.wq, q, tp, "attn.wq"),
        **column_parallel(attn.wk, kv, tp, "attn.wk"),
        **column_parallel(attn.wv, kv, tp, "attn.wv"),
        **row_parallel(attn.wo, q, tp, "attn.wo"),
        **column_parallel(mlp.w1, hidden, tp, "mlp.w1"),
        **column_parallel(mlp.w3, hidden, tp, "mlp.w3"),
        **row_parallel(mlp.w2, hidden, tp, "mlp.w2"),
    }


PLAN = TensorParallelPlan(
    check=check,
    parallelize=parallelize,
    loss=lambda config, tp: vocab_loss(config.vocab_size, tp),
)
