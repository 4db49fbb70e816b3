"""The GPT-2 family: learned positions, LayerNorm, GELU MLP, tied embeddings by default."""

from hpcpipe.models.api import ModelSpec
from hpcpipe.models.gpt2.model import (
    GPT2Config,
    boundary_shape,
    build_layer,
    init_layer,
    layer_flops,
    loss_fn,
    tie_groups,
)

SPEC = ModelSpec(
    name="gpt2",
    config_class=GPT2Config,
    num_layers=lambda config: config.num_layers,
    build_layer=build_layer,
    init_layer=init_layer,
    loss=loss_fn,
    boundary_shape=boundary_shape,
    tie_groups=tie_groups,
    layer_flops=layer_flops,
    tensor_parallel="hpcpipe.models.gpt2.tp:PLAN",
    hf="hpcpipe.models.gpt2.hf:CONVERTER",
)

__all__ = ["SPEC", "GPT2Config"]
