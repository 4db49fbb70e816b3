"""A model family of one's own: select it with `model.arch = "examples.own_model:spec"`."""

from examples.own_model.model import (
    ParallelConfig,
    boundary_shape,
    build_layer,
    init_layer,
    loss,
    tie_groups,
)
from hpcpipe.models.api import ModelSpec

spec = ModelSpec(
    name="examples.own_model:spec",
    config_class=ParallelConfig,
    num_layers=lambda config: config.n_layers + 2,  # embedding, blocks, head
    build_layer=build_layer,
    init_layer=init_layer,
    loss=loss,
    boundary_shape=boundary_shape,
    tie_groups=tie_groups,
)

__all__ = ["spec", "ParallelConfig"]
