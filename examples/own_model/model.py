"""GPT-J-style parallel blocks: x + attn(ln(x)) + mlp(ln(x)), one LayerNorm per block.

Layer 0 embeds tokens and learned positions, layers 1..n_layers are blocks, the last is the
head. Every layer but the last maps (batch, seq_len, d_model) to the same shape, which is the
family's boundary_shape: a pipeline stage may end after any of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hpcpipe.models.api import ModelConfig


@dataclass(frozen=True)
class ParallelConfig(ModelConfig):
    """The [model] keys of this family (every field has a default)."""

    arch: str = "examples.own_model:spec"
    n_layers: int = 2
    """Parallel blocks (the pipeline's layers are these plus the embedding and the head)."""
    d_model: int = 32
    """Width of the residual stream."""
    n_heads: int = 2
    """Attention heads (must divide d_model)."""
    mlp_ratio: int = 4
    """MLP width as a multiple of d_model."""
    init_std: float = 0.02
    """Standard deviation of the normal weight init."""
    tie_embeddings: bool = True
    """The head's weight is the token embedding."""

    def __post_init__(self) -> None:
        for name in ("n_layers", "d_model", "n_heads", "mlp_ratio"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"model.d_model={self.d_model} must divide by n_heads={self.n_heads}")


class Embedding(nn.Module):
    def __init__(self, c: ParallelConfig):
        super().__init__()
        self.tok = nn.Embedding(c.vocab_size, c.d_model)
        self.pos = nn.Embedding(c.seq_len, c.d_model)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tok(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))


class ParallelBlock(nn.Module):
    def __init__(self, c: ParallelConfig):
        super().__init__()
        self.n_heads = c.n_heads
        self.ln = nn.LayerNorm(c.d_model)
        self.qkv = nn.Linear(c.d_model, 3 * c.d_model, bias=False)
        self.out = nn.Linear(c.d_model, c.d_model, bias=False)
        self.fc = nn.Linear(c.d_model, c.mlp_ratio * c.d_model)
        self.proj = nn.Linear(c.mlp_ratio * c.d_model, c.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.ln(x)
        q, k, v = self.qkv(h).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        attn = self.out(attn.transpose(1, 2).reshape(b, t, d))
        return x + attn + self.proj(F.gelu(self.fc(h)))


class Head(nn.Module):
    def __init__(self, c: ParallelConfig):
        super().__init__()
        self.ln_f = nn.LayerNorm(c.d_model)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(x))


def build_layer(config: ParallelConfig, index: int) -> nn.Module:
    """Called on the meta device: shapes only, init_layer fills the values."""
    if index == 0:
        return Embedding(config)
    return Head(config) if index == config.n_layers + 1 else ParallelBlock(config)


def init_layer(layer: nn.Module, config: ParallelConfig, index: int, gen: torch.Generator):
    """Fill every parameter, drawing only from `gen` (seeded by (seed, index))."""
    for module in layer.modules():
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, 0.0, config.init_std, generator=gen)
        if isinstance(module, nn.Linear | nn.LayerNorm) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)


def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def boundary_shape(config: ParallelConfig, batch: int) -> tuple[int, int, int]:
    return (batch, config.seq_len, config.d_model)


def tie_groups(config: ParallelConfig) -> dict[str, tuple[str, ...]]:
    """The head's projection is the token embedding (the first name is the one stored)."""
    if not config.tie_embeddings:
        return {}
    return {"embedding": ("layers.0.tok.weight", f"layers.{config.n_layers + 1}.lm_head.weight")}
