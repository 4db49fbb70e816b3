"""Llama (2/3) as an ordered list of layers: RMSNorm, rotary positions, SwiGLU MLP, GQA.

Layer 0 is the token embedding, layers 1..n_layers are blocks and layer n_layers + 1 is the
head. Weights are laid out as Hugging Face's LlamaForCausalLM (q/k/v rows per head, rotary in
the rotate_half convention), so its checkpoints map 1:1 with no permutation. No dropout, no
biases. Nothing here knows about parallelism (tp.py holds this family's tensor-parallel plan).
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

HALF_PRECISION = (torch.float16, torch.bfloat16)
ROPE_SCALINGS = ("", "llama3")


def _ints(config, names, minimum: int) -> None:
    for name in names:
        value = getattr(config, name)
        # bool is an int subclass; n_layers=True is surely a mistake
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            what = "a positive integer" if minimum else "an integer >= 0 (0 = derived)"
            raise ValueError(f"model.{name} must be {what}, got {value!r}")


def _floats(config, names, positive: bool) -> None:
    for name in names:
        value = getattr(config, name)
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not (ok and math.isfinite(value) and (value > 0 if positive else value >= 0)):
            bound = "> 0" if positive else ">= 0 (0 = unused)"
            raise ValueError(f"model.{name} must be a finite number {bound}, got {value!r}")


@dataclass(frozen=True)
class LlamaConfig(ModelConfig):
    """Shape of a Llama model; validated on construction. Fields are the [model] keys."""

    arch: str = "llama"
    n_layers: int = 4
    """Transformer blocks (the pipeline's layers are these plus the embedding and the head)."""
    d_model: int = 128
    """Width of the residual stream."""
    n_heads: int = 4
    """Query heads (must divide d_model, with an even head size for the rotary embedding)."""
    n_kv_heads: int = 0
    """Key/value heads (grouped-query attention; must divide n_heads); 0 = n_heads."""
    ffn_hidden: int = 0
    """SwiGLU MLP width; 0 = Llama 3's rule from d_model, multiple_of and ffn_dim_multiplier."""
    multiple_of: int = 256
    """The derived MLP width is rounded up to a multiple of this (when ffn_hidden is 0)."""
    ffn_dim_multiplier: float = 0.0
    """Multiplies the derived MLP width (when ffn_hidden is 0); 0 = none."""
    norm_eps: float = 1e-5
    """RMSNorm's epsilon."""
    rope_theta: float = 10000.0
    """Base of the rotary position embedding's frequencies."""
    init_std: float = 0.02
    """Standard deviation of the normal weight init (output projections scaled down by
    sqrt(2 n_layers))."""
    tie_embeddings: bool = False
    """The head's weight is the token embedding (lm_head.weight is tok.weight), as in Llama 3.2
    1B/3B."""
    max_positions: int = 0
    """Maximum positions recorded for Hugging Face export only; 0 = seq_len."""
    rope_scaling: str = ""
    """RoPE scaling: "" = none, "llama3" = Llama 3.1/3.2's (HF rope_type "llama3"), whose
    parameters follow (unused without it)."""
    rope_factor: float = 8.0
    """llama3 rope scaling: how much longer the context is than the original one."""
    rope_low_freq_factor: float = 1.0
    """llama3 rope scaling: wavelengths above original_max_positions / this are scaled."""
    rope_high_freq_factor: float = 4.0
    """llama3 rope scaling: wavelengths below original_max_positions / this are kept."""
    rope_original_max_positions: int = 8192
    """llama3 rope scaling: the context length the model was first trained on."""

    def __post_init__(self) -> None:
        _ints(self, ("n_layers", "d_model", "n_heads", "seq_len", "vocab_size"), 1)
        _ints(self, ("multiple_of", "rope_original_max_positions"), 1)
        _ints(self, ("n_kv_heads", "ffn_hidden", "max_positions"), 0)
        _floats(self, ("norm_eps", "rope_theta", "init_std"), positive=True)
        rope = ("rope_factor", "rope_low_freq_factor", "rope_high_freq_factor")
        _floats(self, rope, positive=True)
        if self.rope_scaling not in ROPE_SCALINGS:
            raise ValueError(
                f"model.rope_scaling must be one of {', '.join(map(repr, ROPE_SCALINGS))} "
                f'("" = none, "llama3" = Llama 3.1\'s), got {self.rope_scaling!r}'
            )
        if self.rope_high_freq_factor <= self.rope_low_freq_factor:
            raise ValueError(
                f"model.rope_high_freq_factor={self.rope_high_freq_factor} must be above "
                f"model.rope_low_freq_factor={self.rope_low_freq_factor} (Llama 3.1: 4.0 and 1.0)"
            )
        _floats(self, ("ffn_dim_multiplier",), positive=False)
        if self.d_model % self.n_heads:
            raise ValueError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
                f"pick n_heads dividing d_model or round d_model to a multiple of {self.n_heads}"
            )
        if self.n_heads % self.kv_heads:
            raise ValueError(
                f"model.n_kv_heads={self.n_kv_heads} does not divide model.n_heads="
                f"{self.n_heads}; each key/value head must serve the same number of query heads "
                "(use a divisor of n_heads, or 0 for n_heads)"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"head size model.d_model / model.n_heads = {self.head_dim} is odd; rotary "
                "embeddings rotate pairs of features, so choose d_model and n_heads giving an "
                "even head size"
            )
        if self.max_positions and self.max_positions < self.seq_len:
            raise ValueError(
                f"model.max_positions={self.max_positions} is below model.seq_len="
                f"{self.seq_len}; use at least seq_len (or 0 for exactly seq_len)"
            )

    @property
    def num_layers(self) -> int:
        """Pipeline layers: embedding + n_layers blocks + head."""
        return self.n_layers + 2

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads, resolved (0 means one per query head)."""
        return self.n_kv_heads or self.n_heads

    @property
    def hidden(self) -> int:
        """Width of the MLP: ffn_hidden, or Llama 3's rule when it is 0."""
        if self.ffn_hidden:
            return self.ffn_hidden
        hidden = int(2 * 4 * self.d_model / 3)
        if self.ffn_dim_multiplier > 0:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    @property
    def llama3_rope(self) -> tuple[float, float, float, int] | None:
        """(factor, low_freq_factor, high_freq_factor, original_max_positions), or None."""
        if self.rope_scaling != "llama3":
            return None
        return (
            self.rope_factor,
            self.rope_low_freq_factor,
            self.rope_high_freq_factor,
            self.rope_original_max_positions,
        )

    @property
    def positions(self) -> int:
        """max_position_embeddings for export."""
        return self.max_positions or self.seq_len


class RMSNorm(nn.Module):
    """weight * x / rms(x), as Hugging Face's LlamaRMSNorm."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # 16-bit inputs are normalised in float32 as HF does; float64 stays float64
        h = x.float() if x.dtype in HALF_PRECISION else x
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def inv_frequencies(head_dim: int, theta: float, device=None, llama3=None) -> torch.Tensor:
    """Rotary inverse frequencies (head_dim / 2,) in float32, as transformers computes them.

    llama3 = (factor, low_freq_factor, high_freq_factor, original_max_positions) applies
    Llama 3.1's scaling with the arithmetic of transformers' _compute_llama3_parameters, step
    for step (float32 tensors, Python-number bounds), so the two agree bit for bit. Its cos/sin
    factor (attention_scaling) is 1.0, so nothing else changes.
    """
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float()
    inv_freq = 1.0 / (theta ** (exponent / head_dim))
    if llama3 is None:
        return inv_freq
    factor, low_freq_factor, high_freq_factor, old_context_len = llama3
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # short wavelengths kept, long ones divided by factor, those between interpolated
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (
        high_freq_factor - low_freq_factor
    )
    smoothed_inv_freq = (
        1 - smooth_factor
    ) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama)


def rotary(
    length: int, head_dim: int, theta: float, like: torch.Tensor, llama3=None, start: int = 0
) -> tuple:
    """(cos, sin) of positions start..start+length-1, (length, head_dim), as HF computes them.

    Frequencies and angles in float32, then cast to the activations' dtype; llama3 as in
    inv_frequencies. Computed per call, never a buffer: layers are built on the meta device (a
    buffer would be garbage after to_empty) and buffers would leak into state dicts.
    """
    inv_freq = inv_frequencies(head_dim, theta, like.device, llama3)
    positions = torch.arange(start, start + length, device=like.device).float()
    freqs = torch.outer(positions, inv_freq)
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos().to(like.dtype), angles.sin().to(like.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of each head."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (b, heads, t, head_dim) by position."""
    return x * cos + rotate_half(x) * sin


class Embedding(nn.Module):
    """Token embedding only: positions enter through rotary attention."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.tok = nn.Embedding(config.vocab_size, config.d_model)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tok(tokens)


class Attention(nn.Module):
    """Causal self-attention with rotary positions and grouped key/value heads.

    Key/value head j serves query heads j*rep..(j+1)*rep-1 (HF's repeat_kv). Head counts are
    read from the weight shapes, so a tensor-parallel rank holding some groups works as is.
    The core (the key/value expansion, scores, softmax, weighted sum; not the rotary) is marked
    for selective recomputation. While generating, positions start at decode_state.offset and
    the rotated keys and the values (not expanded) are kept in decode_state's cache.
    """

    selective_recompute = False  # set by hpcpipe.models.api.enable_selective_recompute
    decode_state = None  # set by hpcpipe.models.api.set_decode_state while generating

    def __init__(self, config: LlamaConfig):
        super().__init__()
        d, hd = config.d_model, config.head_dim
        self.head_dim, self.theta, self.llama3 = hd, config.rope_theta, config.llama3_rope
        self.wq = nn.Linear(d, config.n_heads * hd, bias=False)
        self.wk = nn.Linear(d, config.kv_heads * hd, bias=False)
        self.wv = nn.Linear(d, config.kv_heads * hd, bias=False)
        self.wo = nn.Linear(config.n_heads * hd, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (self._heads(proj(x), b, t) for proj in (self.wq, self.wk, self.wv))
        state = self.decode_state
        start = 0 if state is None else state.offset
        cos, sin = rotary(t, self.head_dim, self.theta, x, self.llama3, start)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if state is not None:
            k, v = state.cache(self).extend(k, v)
        y = attention_core(self, self._core, q, k, v)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))

    def _core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Grouped-query causal attention of rotated (b, heads, t, head_dim) q and k."""
        rep = q.shape[1] // k.shape[1]
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        # the scale passed as HF passes it (head_dim ** -0.5), so the two agree bit for bit
        mask = causal_mask(q, k)
        return F.scaled_dot_product_attention(q, k, v, **mask, scale=self.head_dim**-0.5)

    def _heads(self, x: torch.Tensor, b: int, t: int) -> torch.Tensor:
        """(b, t, heads * head_dim) -> (b, heads, t, head_dim)."""
        return x.view(b, t, -1, self.head_dim).transpose(1, 2)


class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.w1 = nn.Linear(config.d_model, config.hidden, bias=False)
        self.w3 = nn.Linear(config.d_model, config.hidden, bias=False)
        self.w2 = nn.Linear(config.hidden, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Pre-RMSNorm transformer block."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class Head(nn.Module):
    """Final RMSNorm and the language-model projection."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(x))


build_layer = embedding_blocks_head(Embedding, Block, Head)


def init_layer(layer: nn.Module, config: LlamaConfig, index: int, gen: torch.Generator) -> None:
    """Normal(0, init_std) weights in a fixed module order, drawing only from `gen`."""
    resid_std = config.init_std / math.sqrt(2 * config.n_layers)
    for name, module in layer.named_modules():
        if isinstance(module, nn.Linear | nn.Embedding):
            # projections that write into the residual stream are scaled down (as GPT-2's)
            std = resid_std if name in ("attn.wo", "mlp.w2") else config.init_std
            nn.init.normal_(module.weight, 0.0, std, generator=gen)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)


loss_fn = mean_cross_entropy
tie_groups = tied_token_embedding  # the head reuses the token embedding when tie_embeddings
boundary_shape = hidden_states


def layer_flops(config: LlamaConfig) -> list[float]:
    """Forward FLOPs per token of each layer (2 per multiply-add; norms and rotary not counted)."""
    d, v, t = config.d_model, config.vocab_size, config.seq_len
    q, kv = config.n_heads * config.head_dim, config.kv_heads * config.head_dim
    # wq + wk + wv + wo + w1 + w3 + w2, plus q @ k^T and att @ v over the full window
    block = 2 * (d * q + 2 * d * kv + q * d + 3 * d * config.hidden) + 4 * t * q
    head = 2 * d * v
    return [0.0] + [float(block)] * config.n_layers + [float(head)]
