"""Re-plan the (dp, pp, tp) layout for the ranks a job actually has (after losing some).

Rules: tp stays (it is bound to the model's shapes and to the node); among layouts with at
most the configured dp and pp that the model, the batch and the schedule allow, take the one
that keeps the most ranks busy, and between equals drop data-parallel replicas before pipeline
stages (a replica is a copy; a stage is a slice of the model that has to move). Layers are
re-partitioned over the stages that remain.
"""

from __future__ import annotations

import dataclasses

from hpcpipe.config import Config, ConfigError
from hpcpipe.models import get_spec
from hpcpipe.pipeline.schedule import ScheduleError, build_schedule


def _fits(config: Config, dp: int, pp: int) -> bool:
    """Whether the batch, the model's layers and the schedule allow dp x pp."""
    s = config.schedule
    if config.train.global_batch % (dp * s.microbatches):
        return False
    if get_spec(config.model.arch).num_layers(config.model) < pp * s.virtual:
        return False
    try:
        build_schedule(s.name, pp, s.microbatches, s.virtual)
    except ScheduleError:
        return False
    return True


def replan(config: Config, world: int) -> tuple[Config, str]:
    """A config whose layout fits `world` ranks (or fewer), and the explanation to print."""
    p = config.parallel
    if p.dp * p.pp * p.tp == world:
        return config, ""
    if world < p.tp:
        raise ConfigError(
            f"{world} ranks cannot hold one tensor-parallel group of parallel.tp={p.tp}"
        )
    options = [
        (dp * pp * p.tp, pp, dp)
        for dp in range(1, p.dp + 1)
        for pp in range(1, p.pp + 1)
        if dp * pp * p.tp <= world and _fits(config, dp, pp)
    ]
    if not options:
        raise ConfigError(f"no layout with tp={p.tp} fits {world} ranks for this model and batch")
    used, pp, dp = max(options)
    new = dataclasses.replace(config, parallel=dataclasses.replace(p, dp=dp, pp=pp, partition=()))
    idle = world - used
    note = (
        f"elastic re-plan for {world} ranks: dp={p.dp} pp={p.pp} tp={p.tp} -> dp={dp} pp={pp} "
        f"tp={p.tp} ({used} ranks busy{f', {idle} idle' if idle else ''}); kept the most ranks "
        "busy, dropping data-parallel replicas before pipeline stages; layers re-partitioned "
        "over the remaining stages"
    )
    return new, note
