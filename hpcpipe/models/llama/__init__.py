"""The Llama family (Llama 2/3): RMSNorm, rotary positions, SwiGLU, grouped-query attention."""

from hpcpipe.models.api import ModelSpec
from hpcpipe.models.llama.model import (
    LlamaConfig,
    boundary_shape,
    build_layer,
    init_layer,
    layer_flops,
    loss_fn,
    tie_groups,
)

SPEC = ModelSpec(
    name="llama",
    config_class=LlamaConfig,
    num_layers=lambda config: config.num_layers,
    build_layer=build_layer,
    init_layer=init_layer,
    loss=loss_fn,
    boundary_shape=boundary_shape,
    tie_groups=tie_groups,
    layer_flops=layer_flops,
    tensor_parallel="hpcpipe.models.llama.tp:PLAN",
    hf="hpcpipe.models.llama.hf:CONVERTER",
)

__all__ = ["SPEC", "LlamaConfig"]
