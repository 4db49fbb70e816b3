"""GPT-2 as an ordered list of layers, so a pipeline can cut it anywhere.

Layer 0 is the embedding, layers 1..n_layers are transformer blocks and layer n_layers + 1 is
the head. No dropout anywhere: training must be bit-reproducible across layouts. Nothing here
knows about parallelism (tp.py holds this family's tensor-parallel plan).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hpcpipe.models.api import (
    ModelConfig,
    attention_core,
    causal_mask,
    embedding_blocks_head,
    hidden_states,
    mean_cross_entropy,
    tied_token_embedding,
)

ACTIVATIONS = ("gelu", "gelu_tanh")


def _positive_ints(config, names) -> None:
    for name in names:
        value = getattr(config, name)
        # bool is an int subclass; n_layers=True is surely a mistake
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"model.{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class GPT2Config(ModelConfig):
    """Shape of a GPT-2 model; validated on construction. Fields are the [model] keys."""

    arch: str = "gpt2"
    n_layers: int = 4
    """Transformer blocks (the pipeline's layers are these plus the embedding and the head)."""
    d_model: int = 128
    """Width of the residual stream."""
    n_heads: int = 4
    """Attention heads (must divide d_model)."""
    mlp_ratio: int = 4
    """MLP width as a multiple of d_model."""
    init_std: float = 0.02
    """Standard deviation of the normal weight init (residual projections scaled down by
    sqrt(2 n_layers), as GPT-2)."""
    tie_embeddings: bool = True
    """The head's weight is the token embedding (lm_head.weight is tok.weight), as in GPT-2."""
    activation: str = "gelu"
    """MLP activation: gelu, or gelu_tanh (the form GPT-2's own checkpoints use)."""
    max_positions: int = 0
    """Rows of the learned position table; 0 = seq_len."""

    def __post_init__(self) -> None:
        _positive_ints(self, ("n_layers", "d_model", "n_heads", "seq_len", "vocab_size"))
        _positive_ints(self, ("mlp_ratio",))
        if self.d_model % self.n_heads:
            raise ValueError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
                f"pick n_heads dividing d_model or round d_model to a multiple of {self.n_heads}"
            )
        if not (isinstance(self.init_std, int | float) and math.isfinite(self.init_std)):
            raise ValueError(f"model.init_std must be a finite number, got {self.init_std!r}")
        if self.init_std <= 0:
            raise ValueError(f"model.init_std must be > 0, got {self.init_std}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"model.activation={self.activation!r} is not one of {', '.join(ACTIVATIONS)}"
            )
        if self.max_positions and self.max_positions < self.seq_len:
            raise ValueError(
                f"model.max_positions={self.max_positions} is below model.seq_len="
                f"{self.seq_len}; use at least seq_len rows (or 0 for exactly seq_len)"
            )

    @property
    def num_layers(self) -> int:
        """Pipeline layers: embedding + n_layers blocks + head."""
        return self.n_layers + 2

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def hidden(self) -> int:
        """Width of the MLP."""
        return self.mlp_ratio * self.d_model

    @property
    def positions(self) -> int:
        """Rows of the learned position table."""
        return self.max_positions or self.seq_len


class Embedding(nn.Module):
    """Token embedding plus learned position embedding (from decode_state.offset when set)."""

    decode_state = None  # set by hpcpipe.models.api.set_decode_state while generating

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.tok = nn.Embedding(config.vocab_size, config.d_model)
        self.pos = nn.Embedding(config.positions, config.d_model)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        start = 0 if self.decode_state is None else self.decode_state.offset
        if start + t > self.pos.num_embeddings:
            raise ValueError(
                f"sequence of length {start + t} is longer than {self.pos.num_embeddings}"
            )
        pos = torch.arange(start, start + t, device=tokens.device)
        return self.tok(tokens) + self.pos(pos)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused qkv projection.

    The qkv rows are grouped per head ([q_h, k_h, v_h] for h = 0, 1, ...), as in Megatron, so
    the rows of any run of heads are one contiguous block: tensor parallelism takes a block.
    The core (scores, softmax, weighted sum) is marked for selective recomputation; while
    generating, keys and values are kept in decode_state's cache.
    """

    selective_recompute = False  # set by hpcpipe.models.api.enable_selective_recompute
    decode_state = None  # set by hpcpipe.models.api.set_decode_state while generating

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        qkv = self.qkv(x)
        heads = qkv.shape[-1] // (3 * self.head_dim)  # fewer when tensor-parallel
        # (b, t, heads, 3, head_dim) -> three (b, heads, t, head_dim)
        qkv = qkv.view(b, t, heads, 3, self.head_dim).permute(3, 0, 2, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.decode_state is not None:
            k, v = self.decode_state.cache(self).extend(k, v)
        y = attention_core(self, causal_attention, q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, t, heads * self.head_dim))


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The attention core: softmax(q k^T / sqrt(head_dim) + causal mask) v, per head."""
    # checked: deterministic and matches a hand-written masked softmax in float64 on CPU
    return F.scaled_dot_product_attention(q, k, v, **causal_mask(q, k))


class MLP(nn.Module):
    """Linear -> GELU -> Linear."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.fc = nn.Linear(config.d_model, config.hidden)
        self.act = nn.GELU(approximate="tanh" if config.activation == "gelu_tanh" else "none")
        self.proj = nn.Linear(config.hidden, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.d_model)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Head(nn.Module):
    """Final LayerNorm and the language-model projection (tied to tok.weight by default)."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.ln_f = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(x))


build_layer = embedding_blocks_head(Embedding, Block, Head)


def init_layer(layer: nn.Module, config: GPT2Config, index: int, gen: torch.Generator) -> None:
    """GPT-2 init in a fixed module order, drawing only from `gen`."""
    resid_std = config.init_std / math.sqrt(2 * config.n_layers)
    for name, module in layer.named_modules():
        if isinstance(module, nn.Linear | nn.Embedding):
            # projections that write into the residual stream are scaled down
            std = resid_std if name in ("attn.proj", "mlp.proj") else config.init_std
            nn.init.normal_(module.weight, 0.0, std, generator=gen)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


loss_fn = mean_cross_entropy
tie_groups = tied_token_embedding  # the head reuses the token embedding when tie_embeddings
boundary_shape = hidden_states


def layer_flops(config: GPT2Config) -> list[float]:
    """Forward FLOPs per token of each layer (2 per multiply-add)."""
    d, v, t = config.d_model, config.vocab_size, config.seq_len
    embed = d  # the token + position add
    # qkv + proj + mlp, plus q @ k^T and att @ v over the full window
    block = 2 * (4 * d * d + 2 * d * config.hidden) + 4 * t * d
    head = 2 * d * v
    return [float(embed)] + [float(block)] * config.n_layers + [float(head)]
