"""A GPT written as an ordered list of layers, so a pipeline can cut it anywhere.

Layer 0 is the embedding, layers 1..n_layers are transformer blocks and layer
n_layers + 1 is the head. Every layer is initialised from (seed, index) alone,
so any rank can build any layer and get the same weights as every other layout.
No dropout anywhere: training must be bit-reproducible across layouts.
"""

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

COST_KINDS = ("params", "flops")


@dataclass(frozen=True)
class GPTConfig:
    """Shape of the model; validated on construction."""

    n_layers: int
    d_model: int
    n_heads: int
    seq_len: int
    vocab_size: int = 256
    mlp_ratio: int = 4
    init_std: float = 0.02
    tie_embeddings: bool = True  # lm_head.weight is tok.weight, as in GPT-2

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise ValueError naming the first bad field and how to fix it."""
        for name in ("n_layers", "d_model", "n_heads", "seq_len", "vocab_size", "mlp_ratio"):
            value = getattr(self, name)
            # bool is an int subclass; GPTConfig(n_layers=True) is surely a mistake
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads != 0:
            raise ValueError(
                f"GPTConfig.d_model ({self.d_model}) must be divisible by n_heads "
                f"({self.n_heads}); pick n_heads dividing d_model or round d_model to a "
                f"multiple of {self.n_heads}"
            )
        if not (isinstance(self.init_std, int | float) and math.isfinite(self.init_std)):
            raise ValueError(f"GPTConfig.init_std must be a finite number, got {self.init_std!r}")
        if self.init_std <= 0:
            raise ValueError(f"GPTConfig.init_std must be > 0, got {self.init_std}")

    @property
    def num_layers(self) -> int:
        """Pipeline layers: embedding + n_layers blocks + head."""
        return self.n_layers + 2

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.n_heads


class Embedding(nn.Module):
    """Token embedding plus learned position embedding."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.seq_len = config.seq_len
        self.tok = nn.Embedding(config.vocab_size, config.d_model)
        self.pos = nn.Embedding(config.seq_len, config.d_model)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        if t > self.seq_len:
            raise ValueError(f"sequence of length {t} is longer than seq_len={self.seq_len}")
        pos = torch.arange(t, device=tokens.device)
        return self.tok(tokens) + self.pos(pos)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused qkv projection.

    The qkv rows are grouped per head ([q_h, k_h, v_h] for h = 0, 1, ...), as in Megatron, so
    the rows of any run of heads are one contiguous block: tensor parallelism takes a block.
    """

    def __init__(self, config: GPTConfig):
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
        # checked: deterministic and matches a hand-written masked softmax in float64 on CPU
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, heads * self.head_dim))


class MLP(nn.Module):
    """Linear -> GELU -> Linear."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        hidden = config.mlp_ratio * config.d_model
        self.fc = nn.Linear(config.d_model, hidden)
        self.act = nn.GELU()
        self.proj = nn.Linear(hidden, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, config: GPTConfig):
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

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_f = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(x))


def layer_seed(seed: int, index: int) -> int:
    """A stable 63-bit seed for layer `index` of a model seeded with `seed`."""
    # hash rather than seed + index, so neighbouring seeds don't share layers
    digest = hashlib.sha256(f"hpcpipe:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _init_weights(layer: nn.Module, config: GPTConfig, gen: torch.Generator) -> None:
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


def build_layer(
    config: GPTConfig, index: int, seed: int, dtype: torch.dtype = torch.float32
) -> nn.Module:
    """Build layer `index` on CPU, with weights that depend only on (config, seed, index)."""
    if not 0 <= index < config.num_layers:
        raise ValueError(f"layer index {index} out of range 0..{config.num_layers - 1}")
    if index == 0:
        kind = Embedding
    elif index == config.num_layers - 1:
        kind = Head
    else:
        kind = Block
    # build on the meta device: PyTorch's default init would draw from (and advance)
    # the global RNG, and we overwrite every value anyway
    with torch.device("meta"):
        layer = kind(config)
    layer = layer.to_empty(device="cpu").float()
    gen = torch.Generator(device="cpu").manual_seed(layer_seed(seed, index))
    with torch.no_grad():
        _init_weights(layer, config, gen)
        if kind is Head and config.tie_embeddings:
            # A separate copy where the head lives apart from the embedding: it starts equal,
            # and the pipeline sums the two copies' gradients so they stay equal.
            layer.lm_head.weight.copy_(build_layer(config, 0, seed).tok.weight)
    # always draw in float32, then cast: a float64 model starts from exactly the
    # float32 model's weights, so the two differ only in arithmetic
    return layer.to(dtype)


def tie_if_both_present(config: GPTConfig, layers: Mapping[int, nn.Module]) -> None:
    """Share one Parameter between tok and lm_head when the same module holds both."""
    last = config.num_layers - 1
    if config.tie_embeddings and 0 in layers and last in layers:
        layers[last].lm_head.weight = layers[0].tok.weight


class GPT(nn.Module):
    """The whole model on one process; the reference every pipeline layout must match."""

    def __init__(self, config: GPTConfig, seed: int = 0, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(
            [build_layer(config, i, seed, dtype) for i in range(config.num_layers)]
        )
        tie_if_both_present(config, {i: layer for i, layer in enumerate(self.layers)})

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = tokens
        for layer in self.layers:
            x = layer(x)
        return x


class Stage(nn.Module):
    """A contiguous slice of layers, keyed by global index so names match GPT's."""

    def __init__(
        self,
        config: GPTConfig,
        layer_indices: range,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ):
        indices = list(layer_indices)
        if not indices or indices[0] < 0 or indices[-1] >= config.num_layers:
            raise ValueError(
                f"layer_indices {layer_indices} must be a non-empty range within "
                f"0..{config.num_layers - 1}"
            )
        super().__init__()
        layers = {i: build_layer(config, i, seed, dtype) for i in indices}
        tie_if_both_present(config, layers)
        self._set_layers(layers)

    @classmethod
    def from_layers(cls, layers: Mapping[int, nn.Module]) -> "Stage":
        """Wrap already-built layers, e.g. sliced out of a GPT's layers."""
        stage = cls.__new__(cls)
        nn.Module.__init__(stage)
        stage._set_layers(layers)
        return stage

    def _set_layers(self, layers: Mapping[int, nn.Module]) -> None:
        indices = sorted(layers)
        if not indices or indices != list(range(indices[0], indices[-1] + 1)):
            raise ValueError(f"a stage needs a non-empty contiguous set of layers, got {indices}")
        self.layer_indices = range(indices[0], indices[-1] + 1)
        self.layers = nn.ModuleDict({str(i): layers[i] for i in indices})

    @property
    def is_first(self) -> bool:
        """True if this stage takes token ids (holds the embedding)."""
        return isinstance(self.layers[str(self.layer_indices[0])], Embedding)

    @property
    def is_last(self) -> bool:
        """True if this stage produces logits (holds the head)."""
        return isinstance(self.layers[str(self.layer_indices[-1])], Head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers.values():
            x = layer(x)
        return x


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every token in the batch."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def layer_costs(config: GPTConfig, kind: str = "params") -> list[float]:
    """Cost of each layer (embedding and head included): parameters or forward flops/token."""
    d, v, t = config.d_model, config.vocab_size, config.seq_len
    hidden = config.mlp_ratio * d
    if kind == "params":
        embed = (v + t) * d
        # ln1 + qkv + proj + ln2 + fc + proj, weights and biases
        block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * hidden + hidden)
        block += hidden * d + d
        head = 2 * d + d * v
    elif kind == "flops":
        embed = d  # the token + position add
        # 2 flops per multiply-add: qkv + proj + mlp (= 24 d^2 at mlp_ratio 4),
        # plus q @ k^T and att @ v over the full window
        block = 2 * (4 * d * d + 2 * d * hidden) + 4 * t * d
        head = 2 * d * v
    else:
        raise ValueError(f"unknown cost kind {kind!r}; use one of {', '.join(COST_KINDS)}")
    return [float(embed)] + [float(block)] * config.n_layers + [float(head)]
