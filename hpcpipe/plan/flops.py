"""Parameters and FLOPs of a model: per layer, per optimizer step (model and hardware FLOPs).

The FLOP convention is MFU's (Narayanan et al. 2021, Megatron; Chowdhery et al. 2022, PaLM):
2 FLOPs per multiply-add of every GEMM, the attention matmuls q @ k^T and att @ v over the
full window (no halving for the causal mask), backward twice the forward. The family's
ModelSpec.layer_flops gives each layer's forward FLOPs per token. Model FLOPs leave
recomputation out (what MFU divides by the peak); hardware FLOPs add it (what the device ran).
"""

from __future__ import annotations

import torch

from hpcpipe.config import recompute_mode
from hpcpipe.models.api import SELECTIVE_RECOMPUTE, ModelSpec, tie_within

BACKWARD_PER_FORWARD = 2  # grad wrt the input and wrt the weights: one GEMM each


def param_count(spec: ModelSpec, config) -> int:
    """Parameters of the whole model, a tied group counted once (layers built on meta)."""
    with torch.device("meta"):
        layers = {i: spec.build_layer(config, i) for i in range(spec.num_layers(config))}
    tie_within(spec, config, layers)  # one Parameter per tie group, as build_model has
    unique = {id(p): p for layer in layers.values() for p in layer.parameters()}
    return sum(p.numel() for p in unique.values())


def layer_forward_flops(spec: ModelSpec, config, microbatch_size: int, tp: int = 1) -> list[float]:
    """Forward FLOPs of one micro-batch through each layer, on one of `tp` ranks.

    Tensor parallelism splits every GEMM of a block and the head tp ways (Megatron's column and
    row layers, the vocabulary-parallel head); the embedding's count is the position add, ~0.
    """
    if spec.layer_flops is None:
        raise ValueError(
            f"model.arch={spec.name!r} gives no FLOP counts: the family must supply "
            "ModelSpec.layer_flops (forward FLOPs per token of each layer)"
        )
    tokens = microbatch_size * config.seq_len
    return [float(per_token) * tokens / tp for per_token in spec.layer_flops(config)]


def model_flops_per_step(spec: ModelSpec, config, global_batch: int) -> float:
    """Forward and backward FLOPs of every layer for global_batch sequences, no recomputation."""
    forward = sum(layer_forward_flops(spec, config, global_batch))
    return (1 + BACKWARD_PER_FORWARD) * forward


def hardware_flops_per_step(spec: ModelSpec, config, global_batch: int, recompute) -> float:
    """Model FLOPs plus what schedule.recompute (any accepted spelling) adds to a step.

    "full": the runtime recomputes every stage's whole forward in B, the last stage's head and
    loss included, so one more forward of every layer. "selective": one more forward of each
    attention core (scores and weighted sum). "false": nothing.
    """
    mode = recompute_mode(recompute)
    flops = model_flops_per_step(spec, config, global_batch)
    if mode == "full":
        return flops + sum(layer_forward_flops(spec, config, global_batch))
    if mode == "selective":
        return flops + attention_core_flops(spec, config, global_batch)
    return flops


def attention_core_flops(spec: ModelSpec, config, global_batch: int) -> float:
    """Forward FLOPs of every attention core: q @ k^T and att @ v, 2 * s * (heads * head_dim)
    each per token, in every module that marks a core (models.api.attention_core)."""
    width = _query_width(spec, config)
    cores = _modules_declaring(spec, config, SELECTIVE_RECOMPUTE)
    return float(cores * 4 * config.seq_len * width * global_batch * config.seq_len)


def _query_width(spec: ModelSpec, config) -> int:
    """n_heads * head_dim: the width the attention matmuls contract over and produce."""
    try:
        return config.n_heads * config.head_dim
    except AttributeError:
        raise ValueError(
            f"model.arch={spec.name!r}: counting its attention cores needs config.n_heads and "
            "config.head_dim"
        ) from None


def _modules_declaring(spec: ModelSpec, config, attribute: str) -> int:
    """How many modules of all layers declare `attribute` (layers built on meta)."""
    with torch.device("meta"):
        layers = [spec.build_layer(config, i) for i in range(spec.num_layers(config))]
    return sum(hasattr(m, attribute) for layer in layers for m in layer.modules())


def rank_throughput(
    step_flops: float | None, step_time: float, world_size: int, peak_tflops: float | None
) -> dict[str, float | None]:
    """{"tflops_per_rank", "mfu"} of one step: step_flops / step_time / world_size in TFLOP/s,
    and that over the peak; None where the FLOPs (no layer_flops) or the peak are unknown."""
    if step_flops is None:
        return {"tflops_per_rank": None, "mfu": None}
    tflops = step_flops / step_time / world_size / 1e12
    return {"tflops_per_rank": tflops, "mfu": tflops / peak_tflops if peak_tflops else None}
