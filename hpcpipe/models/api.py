"""The model API: what a model family supplies so hpcpipe can build, split and train it.

A model is an ordered list of layers (DeepSpeed's PipelineModule/LayerSpec idea). Layer i is
built on the meta device from the family's config, then initialised from its own generator
seeded by (seed, i), so any rank builds any layer and every layout starts from the same weights.
Pipeline, parallel and checkpoint code see only this API, never a family's classes.

A family is one `ModelSpec`. Its config is a frozen dataclass deriving from `ModelConfig`: its
fields are the `[model]` keys (every field needs a default), its `__post_init__` validates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class ModelConfig:
    """Keys every family has: the training window and the vocabulary (data needs them)."""

    arch: str = ""
    """Model family: gpt2, llama, or "package.module:attribute" naming your own ModelSpec."""
    seq_len: int = 64
    """Tokens per training sequence (the context window trained on)."""
    vocab_size: int = 256
    """Token ids the embedding and the head cover (256 for the byte tokenizer)."""


@dataclass(frozen=True)
class TensorParallelPlan:
    """How a family's layers split over the tp axis (torchtitan's per-model parallelize).

    check(config, tp) raises ValueError when the shapes cannot split; parallelize(layer, index,
    config, tp_context) swaps the layer's modules in place and returns {local parameter name:
    (dim, offset, global size)} for the sharded ones; loss(config, tp_context) is the last
    stage's loss over vocabulary-split logits.
    """

    check: Callable
    parallelize: Callable
    loss: Callable


@dataclass(frozen=True)
class ModelSpec:
    """One model family, in one place.

    - config_class: the family's ModelConfig subclass (its fields are the [model] keys)
    - num_layers(config): how many pipeline layers the model has
    - build_layer(config, index): layer `index`; called on the meta device
    - init_layer(layer, config, index, generator): fill every parameter, drawing only from it
    - loss(logits, targets): mean loss over every token of a micro-batch
    - tie_groups(config): {key: (global names...)}; the first name is the one stored
    - boundary_shape(config, batch): activation shape between two layers (stage boundaries)
    - layer_flops(config): forward FLOPs per token of each layer, or None
    - tensor_parallel: "module:attribute" of its TensorParallelPlan (imported when tp > 1,
      so a serial run never imports MPI), or "" when the family has none
    - hf: "module:attribute" of its Hugging Face converter, or ""
    """

    name: str
    config_class: type
    num_layers: Callable
    build_layer: Callable
    init_layer: Callable
    loss: Callable
    boundary_shape: Callable
    tie_groups: Callable = lambda config: {}
    layer_flops: Callable | None = None
    tensor_parallel: str = ""
    hf: str = ""

    def tp_plan(self) -> TensorParallelPlan | None:
        """The tensor-parallel plan, imported on first use."""
        return resolve(self.tensor_parallel) if self.tensor_parallel else None

    def hf_converter(self):
        """The Hugging Face converter, imported on first use (None when there is none)."""
        return resolve(self.hf) if self.hf else None


def embedding_blocks_head(embedding: Callable, block: Callable, head: Callable) -> Callable:
    """build_layer for the usual stack: layer 0 embedding, the last the head, blocks between.

    Each argument is a layer class (or any callable) taking the family's config.
    """

    def build_layer(config, index: int):
        if index == 0:
            return embedding(config)
        if index == config.num_layers - 1:
            return head(config)
        return block(config)

    return build_layer


def mean_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every token of a micro-batch (a language model's loss).

    16-bit logits are upcast to float32 first, as Megatron does unless told otherwise
    (--fp16-lm-cross-entropy): the log-sum-exp over a large vocabulary loses bits in 16 bits.
    """
    logits = logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def tied_token_embedding(config) -> dict[str, tuple[str, ...]]:
    """The head's `lm_head.weight` is layer 0's `tok.weight` when config.tie_embeddings is set."""
    if not config.tie_embeddings:
        return {}
    return {"embedding": ("layers.0.tok.weight", f"layers.{config.num_layers - 1}.lm_head.weight")}


def hidden_states(config, batch: int) -> tuple[int, int, int]:
    """(batch, seq_len, d_model): what a transformer's layers pass on."""
    return (batch, config.seq_len, config.d_model)


# --- selective activation recomputation ------------------------------------------------------
#
# Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models"),
# Megatron's --recompute-granularity selective: keep each layer's activations except those of
# its attention core (q, k, v -> scores, softmax, weighted sum -> output), which is recomputed
# in backward. A family marks its core in its attention module:
#
#     class Attention(nn.Module):
#         selective_recompute = False  # the protocol: enable_selective_recompute sets it
#
#         def forward(self, x):
#             q, k, v = ...
#             y = attention_core(self, core_fn, q, k, v)  # core_fn: no parameters, no dropout
#             return self.out(y ...)
#
# The core runs under torch.utils.checkpoint (use_reentrant=False, no RNG state: no dropout),
# so what it saves for backward is dropped after forward and recomputed when backward needs it;
# the checkpoint keeps the core's inputs instead. With the flag off it is a plain call.
#
# What that drops per layer, measured with saved_tensors_hooks (unique storages, parameters
# excluded; torch 2.13 on CPU; tests/test_recompute.py checks it byte for byte). b = micro-batch,
# s = seq_len, h = query heads, h_kv = key/value heads (GPT-2: h), d = head_dim, e = bytes of
# the activation dtype, a = bytes of the kernel's accumulator: 8 for float64, 4 for float32 and
# bfloat16 (both kernels compute 16-bit attention in float32). Dropped = what the core saves
# minus its inputs, which the checkpoint keeps and nothing else in the layer saves.
#
# * Default CPU kernel (_scaled_dot_product_flash_attention_for_cpu; chosen for float64,
#   float32 and bfloat16): saves q, k, v, the output and the logsumexp (b, h, s) in `a` bytes;
#   never an s x s matrix. Its output is laid out (b, s, h, d), so the output projection's input
#   y.transpose(1, 2).reshape(...) is a view of it, saved anyway. Dropped:
#       b*h*s*a  +  2*b*(h - h_kv)*s*d*e
#   (the logsumexp, plus for grouped-query attention the expanded keys and values: the
#   expansion is inside Llama's core, as in Megatron's DotProductAttention). The benchmark GPT
#   (jobs/configs/benchmark.toml: b=4, s=128, h=4, d=64, float32) drops 8 KiB of a block's
#   8.0 MiB: with this kernel selective recomputation buys almost nothing but costs a second
#   attention forward.
# * Math fallback (e.g. under sdpa_kernel(SDPBackend.MATH)): saves q and k scaled, a contiguous
#   v (each b*h*s*d*a: 16-bit inputs are upcast) and the softmax (b, h, s, s) in `a` bytes, one
#   storage for the softmax and matmul. Dropped:
#       b*h*s*s*a  +  3*b*h*s*d*a  -  b*(h + 2*h_kv)*s*d*e
#   the s^2 term the paper targets (2 MiB of the benchmark GPT's block in float64).
#
# The core is recomputed under the SDPA backends enabled at forward (see
# _same_attention_kernels), so both kernels' savings hold whatever wraps the backward.

SELECTIVE_RECOMPUTE = "selective_recompute"  # the attribute a module with a core declares


def attention_core(module: nn.Module, fn: Callable[..., torch.Tensor], *tensors) -> torch.Tensor:
    """fn(*tensors): `module`'s attention core, recomputed in backward when it is switched on.

    `module` must declare `selective_recompute` (a class attribute, False by default);
    enable_selective_recompute sets it. fn must hold no parameters and draw no random numbers
    (it is run twice). Without grad mode (inference, the runtime's no-grad forward of full
    recomputation, meta-device shape checks) it is always a plain call.
    """
    try:
        on = getattr(module, SELECTIVE_RECOMPUTE)
    except AttributeError:
        raise TypeError(
            f"{type(module).__name__} calls attention_core but does not declare "
            f"`{SELECTIVE_RECOMPUTE} = False`; add it as a class attribute so "
            "enable_selective_recompute can find the module"
        ) from None
    if on and torch.is_grad_enabled():
        return checkpoint(
            fn,
            *tensors,
            use_reentrant=False,
            preserve_rng_state=False,
            context_fn=_same_attention_kernels(),
        )
    return fn(*tensors)


def _same_attention_kernels() -> Callable:
    """checkpoint's context_fn: recompute under the SDPA backends enabled now, at forward.

    Backward usually runs outside a `with sdpa_kernel(...)` that wrapped the forward; another
    kernel saves other tensors and the checkpoint refuses them (CheckpointError).
    """
    from torch.nn.attention import _cur_sdpa_kernel_backends, sdpa_kernel  # what sdpa_kernel uses

    backends = _cur_sdpa_kernel_backends(with_priority=True)
    return lambda: (contextlib.nullcontext(), sdpa_kernel(backends, set_priority=True))


def enable_selective_recompute(module: nn.Module, enabled: bool = True) -> int:
    """Switch selective recomputation on (or off) in every submodule that marks a core.

    Returns how many modules declare `selective_recompute` (each now set to `enabled`). A stage
    may hold none (only the embedding or the head), so 0 is no error here; a family whose layers
    mark no core anywhere (examples/own_model) is refused when the config is checked
    (supports_selective_recompute: a ConfigError on every rank alike, before any communication)
    rather than warned about, since it would run with none of the memory the user asked for.
    """
    return _set_on_declaring(module, SELECTIVE_RECOMPUTE, bool(enabled))


def supports_selective_recompute(spec: ModelSpec, config) -> bool:
    """Whether any layer of the model marks an attention core (counted on meta layers)."""
    return _any_layer_declares(spec, config, SELECTIVE_RECOMPUTE)


def _set_on_declaring(module: nn.Module, attribute: str, value) -> int:
    """Set `attribute` on every submodule that declares it; return how many did."""
    count = 0
    for sub in module.modules():
        if hasattr(sub, attribute):
            setattr(sub, attribute, value)
            count += 1
    return count


def _any_layer_declares(spec: ModelSpec, config, attribute: str) -> bool:
    """Whether a module of any layer declares `attribute` (layers built on meta)."""
    with torch.device("meta"):
        for index in range(spec.num_layers(config)):
            layer = spec.build_layer(config, index)
            if any(hasattr(m, attribute) for m in layer.modules()):
                return True
    return False


# --- generation: key/value caches and positions ----------------------------------------------
#
# While generating, each stage keeps the keys and values of every token its attention layers
# have seen, per sequence being generated (a micro-batch), so a step feeds only the new tokens.
# A module whose output depends on other positions or on absolute positions declares
#
#     class Attention(nn.Module):
#         decode_state = None  # the protocol: set_decode_state hands it a DecodeState
#
#         def forward(self, x):
#             q, k, v = ...                       # rotary (if any) at state.offset + i
#             if self.decode_state is not None:
#                 k, v = self.decode_state.cache(self).extend(k, v)
#             y = F.scaled_dot_product_attention(q, k, v, **causal_mask(q, k))
#
# and a learned position table reads `decode_state.offset` (the absolute position of the
# first input token). With no state set (training, or generation that recomputes the whole
# prefix) the modules behave as before. During generation a stage boundary carries
# boundary_shape(config, batch) with its dim 1 (the sequence) set to the tokens in flight.
# A family none of whose modules declares `decode_state` is refused for cached generation
# (supports_decoding), since feeding it one token at a time would silently drop the prefix.

DECODE_STATE = "decode_state"  # the attribute a module taking part in cached decoding declares


class KVCache:
    """Keys and values of one attention module for one sequence: (b, heads, length, head_dim).

    With a capacity the buffers are allocated once and written in place (no copy per step);
    without one each step concatenates.
    """

    def __init__(self, capacity: int = 0):
        self.capacity, self.length = capacity, 0
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new tokens' k and v (dim 2); return every key and value so far."""
        new = self.length + k.shape[2]
        if self.capacity and new > self.capacity:
            raise ValueError(f"key/value cache of {self.capacity} positions cannot take {new}")
        if self.capacity:
            if self.keys is None:
                shape = (k.shape[0], k.shape[1], self.capacity, k.shape[3])
                self.keys = k.new_empty(shape)
                self.values = v.new_empty((*shape[:3], v.shape[3]))
            self.keys[:, :, self.length : new] = k
            self.values[:, :, self.length : new] = v
            self.length = new
            return self.keys[:, :, :new], self.values[:, :, :new]
        self.keys = k if self.keys is None else torch.cat((self.keys, k), dim=2)
        self.values = v if self.values is None else torch.cat((self.values, v), dim=2)
        self.length = new
        return self.keys, self.values


class DecodeState:
    """What a stage's modules read while generating: which sequence, and from which position.

    Holds one KVCache per (micro-batch, module). `select(microbatch, offset)` before each
    forward of the stage; `capacity(microbatch)` (positions a sequence may reach) lets caches
    preallocate.
    """

    def __init__(self, capacity: Callable[[int], int] | None = None):
        self._caches: dict[int, dict[nn.Module, KVCache]] = {}
        self._capacity = capacity or (lambda microbatch: 0)
        self.microbatch = 0
        self.offset = 0

    def select(self, microbatch: int, offset: int) -> None:
        """The next forward is micro-batch `microbatch`, its first token at position `offset`."""
        self.microbatch, self.offset = microbatch, offset

    def cache(self, module: nn.Module) -> KVCache:
        """`module`'s cache for the selected micro-batch (made on first use)."""
        caches = self._caches.setdefault(self.microbatch, {})
        if module not in caches:
            caches[module] = KVCache(self._capacity(self.microbatch))
        return caches[module]

    def drop(self, microbatch: int) -> None:
        """Free a finished sequence's caches."""
        self._caches.pop(microbatch, None)


def causal_mask(q: torch.Tensor, k: torch.Tensor) -> dict:
    """scaled_dot_product_attention's mask arguments for queries that are the newest keys.

    q: (..., t, d) new tokens; k: (..., length, d) with the t new ones last. Equal lengths are
    the usual causal mask; one query sees every key; otherwise query i sees keys up to
    length - t + i (a prompt fed after a cached prefix).
    """
    t, length = q.shape[-2], k.shape[-2]
    if t == length:
        return {"is_causal": True}
    if t == 1:
        return {}
    mask = torch.ones(t, length, dtype=torch.bool, device=q.device).tril(length - t)
    return {"attn_mask": mask}


def set_decode_state(module: nn.Module, state: DecodeState | None) -> int:
    """Hand `state` (None: back to training behaviour) to every submodule declaring it.

    Returns how many modules declare `decode_state`; a stage may hold none (Llama's embedding).
    """
    return _set_on_declaring(module, DECODE_STATE, state)


def supports_decoding(spec: ModelSpec, config) -> bool:
    """Whether any layer of the model declares `decode_state` (counted on meta layers)."""
    return _any_layer_declares(spec, config, DECODE_STATE)


def resolve(target: str):
    """The object named by 'package.module:attribute'."""
    module_name, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module_name), attribute)


def layer_seed(seed: int, index: int) -> int:
    """A stable 63-bit seed for layer `index` of a model seeded with `seed`."""
    # hash rather than seed + index, so neighbouring seeds don't share layers
    digest = hashlib.sha256(f"hpcpipe:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def build_layer(
    spec: ModelSpec, config, index: int, seed: int, dtype: torch.dtype = torch.float32
) -> nn.Module:
    """Layer `index` on CPU, with weights that depend only on (config, seed, index)."""
    n = spec.num_layers(config)
    if not 0 <= index < n:
        raise ValueError(f"layer index {index} out of range 0..{n - 1}")
    # NOTE: built on the meta device: torch's default init would draw from (and advance) the
    # global RNG, and every value is overwritten anyway.
    with torch.device("meta"):
        layer = spec.build_layer(config, index)
    layer = layer.to_empty(device="cpu").float()
    gen = torch.Generator(device="cpu").manual_seed(layer_seed(seed, index))
    with torch.no_grad():
        spec.init_layer(layer, config, index, gen)
        _copy_tied_from_source(spec, config, index, seed, layer)
    # always drawn in float32, then cast: a float64 model starts from exactly the float32
    # model's weights, so the two differ only in arithmetic
    return layer.to(dtype)


def split_name(name: str) -> tuple[int, str]:
    """'layers.7.attn.qkv.weight' -> (7, 'attn.qkv.weight')."""
    prefix, index, rest = name.split(".", 2)
    if prefix != "layers":
        raise ValueError(f"global parameter names start with 'layers.<index>.', got {name!r}")
    return int(index), rest


def _copy_tied_from_source(spec: ModelSpec, config, index: int, seed: int, layer) -> None:
    """A tied copy held apart from its source starts equal to it (the pipeline keeps it so)."""
    for names in spec.tie_groups(config).values():
        source_index, source_name = split_name(names[0])
        for name in names[1:]:
            copy_index, copy_name = split_name(name)
            if copy_index == index and source_index != index:
                source = build_layer(spec, config, source_index, seed).get_parameter(source_name)
                layer.get_parameter(copy_name).copy_(source)


def tie_within(spec: ModelSpec, config, layers: Mapping[int, nn.Module]) -> None:
    """Share one Parameter between the members of a tie group that one set of layers holds."""
    for names in spec.tie_groups(config).values():
        held = [split_name(n) for n in names if split_name(n)[0] in layers]
        if len(held) < 2:
            continue
        source = layers[held[0][0]].get_parameter(held[0][1])
        for index, name in held[1:]:
            owner, _, leaf = name.rpartition(".")
            setattr(layers[index].get_submodule(owner) if owner else layers[index], leaf, source)


class Stage(nn.Module):
    """A contiguous slice of layers, keyed by global index so names match the whole model's."""

    def __init__(self, layers: Mapping[int, nn.Module]):
        super().__init__()
        indices = sorted(layers)
        if not indices or indices != list(range(indices[0], indices[-1] + 1)):
            raise ValueError(f"a stage needs a non-empty contiguous set of layers, got {indices}")
        self.layer_indices = range(indices[0], indices[-1] + 1)
        self.layers = nn.ModuleDict({str(i): layers[i] for i in indices})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers.values():
            x = layer(x)
        return x


def build_stage(
    spec: ModelSpec, config, layer_indices: range, seed: int = 0, dtype=torch.float32
) -> Stage:
    """The layers `layer_indices` of the model, tied where one stage holds a whole group."""
    n = spec.num_layers(config)
    indices = list(layer_indices)
    if not indices or indices[0] < 0 or indices[-1] >= n:
        raise ValueError(
            f"layer_indices {layer_indices} must be a non-empty range within 0..{n - 1}"
        )
    layers = {i: build_layer(spec, config, i, seed, dtype) for i in indices}
    tie_within(spec, config, layers)
    return Stage(layers)


def build_model(spec: ModelSpec, config, seed: int = 0, dtype=torch.float32) -> Stage:
    """The whole model on one process: the reference every pipeline layout must match."""
    return build_stage(spec, config, range(spec.num_layers(config)), seed, dtype)


def param_costs(spec: ModelSpec, config) -> list[float]:
    """Parameters of each layer, counted on meta layers (no memory, no init)."""
    with torch.device("meta"):
        layers = [spec.build_layer(config, i) for i in range(spec.num_layers(config))]
    return [float(sum(p.numel() for p in layer.parameters())) for layer in layers]


def layer_costs(spec: ModelSpec, config, kind: str = "params") -> list[float]:
    """Cost of each layer for balancing stages: parameters, or forward FLOPs per token."""
    if kind == "params":
        return param_costs(spec, config)
    if kind == "flops" and spec.layer_flops is not None:
        return [float(c) for c in spec.layer_flops(config)]
    kinds = ["params"] + (["flops"] if spec.layer_flops is not None else [])
    raise ValueError(
        f"unknown cost kind {kind!r} for model.arch={spec.name!r}; use one of {', '.join(kinds)}"
    )


def check_boundaries(spec: ModelSpec, config, batch: int) -> None:
    """Run the model on meta tensors; every layer but the last must emit boundary_shape.

    A stage boundary can fall after any layer but the last, and the receiving rank allocates
    boundary_shape, so a mismatch here would corrupt or hang a pipeline run.
    """
    expected = tuple(spec.boundary_shape(config, batch))
    n = spec.num_layers(config)
    x = torch.zeros(batch, config.seq_len, dtype=torch.long, device="meta")
    with torch.device("meta"), torch.no_grad():
        for index in range(n):
            x = spec.build_layer(config, index)(x)
            if index < n - 1 and tuple(x.shape) != expected:
                raise ValueError(
                    f"model.arch={spec.name!r}: layer {index} outputs shape {tuple(x.shape)} but "
                    f"the family's boundary_shape is {expected}; a pipeline stage may end after "
                    "any layer, so every layer but the last must output boundary_shape (fix the "
                    "family's layers or its boundary_shape)"
                )


def config_keys(spec: ModelSpec) -> list[str]:
    """The [model] keys of a family."""
    return [f.name for f in dataclasses.fields(spec.config_class)]
