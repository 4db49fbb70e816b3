"""A trainer's state as checkpoint shards keyed by GLOBAL names, and back onto any layout.

Parameters and AdamW moments are saved under the parameter's global name (moments prefixed
`optim.exp_avg/`, `optim.exp_avg_sq/`, `optim.step/`), with the slice a tensor-parallel rank
holds. A tied copy is never saved: it is its group's first member, and it loads from there.
"""

from __future__ import annotations

import base64

import torch

from hpcpipe import config as cfg
from hpcpipe.checkpoint.format import Shard
from hpcpipe.checkpoint.store import load_checkpoint, save_checkpoint
from hpcpipe.parallel.tensor_parallel import shard_placement

MOMENTS = ("exp_avg", "exp_avg_sq")


def canonical_name(trainer, name: str) -> str:
    """The name a tied copy is stored under (its group's first member)."""
    return trainer.canonical.get(name, name)


def _placement(trainer, name: str, tensor: torch.Tensor):
    """(global shape, offsets, real local shape) of a local tensor; drops vocabulary padding."""
    return shard_placement(tensor, trainer.tp_specs.get(name))


def _trim(tensor: torch.Tensor, local_shape) -> torch.Tensor:
    """The real (unpadded) rows of a local tensor."""
    for dim, n in enumerate(local_shape):
        tensor = tensor.narrow(dim, 0, n)
    return tensor


def _saved_params(trainer):
    """(name, parameter) pairs this rank writes: no tied copies."""
    return [(n, p) for n, p in trainer.named_params if canonical_name(trainer, n) == n]


def shards(trainer) -> list[Shard]:
    """Every tensor this rank contributes: parameters, AdamW moments and step counts."""
    out = []
    for name, p in _saved_params(trainer):
        gshape, offsets, local = _placement(trainer, name, p)
        out.append(Shard(name, _trim(p.detach(), local), gshape, offsets))
        state = trainer.optimizer.state.get(p, {})
        for moment in MOMENTS:
            if moment in state:
                value = _trim(state[moment], local)
                out.append(Shard(f"optim.{moment}/{name}", value, gshape, offsets))
        if "step" in state:
            out.append(Shard(f"optim.step/{name}", state["step"].reshape(()), (), ()))
    return out


def manifest(trainer) -> dict:
    """What a restart needs besides tensors (the checkpoint adds checksums and layout)."""
    comm = trainer.grid.cart
    rng = base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()
    sampler = trainer.sampler.state_dict() if trainer.sampler is not None else None
    gathered = comm.allgather({"rng": rng, "sampler": sampler})
    sampler = next(g["sampler"] for g in gathered if g["sampler"] is not None)
    p = trainer.config.parallel
    return {
        "config": cfg.to_dict(trainer.config),
        "layout": {"dp": p.dp, "pp": p.pp, "tp": p.tp, "order": p.order,
                   "schedule": trainer.config.schedule.name,
                   "virtual": trainer.config.schedule.virtual,
                   "partition": [list(b) for b in trainer.blueprint.partition.bounds]},
        "sampler": sampler,
        "lr_schedule": {"step": trainer.step_index},
        "rng": [g["rng"] for g in gathered],
    }  # fmt: skip


def save(trainer, root) -> str:
    """Collective: write this step's checkpoint under root; return the step directory."""
    g = trainer.grid
    path = save_checkpoint(
        root,
        trainer.step_index,
        g.cart,
        shards(trainer),
        writer=g.dp_rank == 0,
        position=f"pp{g.pp_rank}_tp{g.tp_rank}",
        manifest=manifest(trainer),
        keep=trainer.config.checkpoint.keep,
        timeout=trainer.config.parallel.timeout,
        on_dataset=_fault_hook(trainer),
    )
    return str(path)


def _fault_hook(trainer):
    """HPCPIPE_FAULT with action=ckpt: die after the first dataset of this step's shard."""
    injection = trainer.runtime.fault_injection
    if injection is None or not injection.fires(
        trainer.runtime.world_rank, trainer.step_index, "ckpt"
    ):
        return None
    return lambda _name: injection.fire()


def _wanted(trainer) -> list[tuple]:
    """(stored name, global shape, offsets, local shape) for every tensor this rank needs."""
    wanted = {}
    for name, p in trainer.named_params:
        stored = canonical_name(trainer, name)
        gshape, offsets, local = _placement(trainer, name, p)
        wanted[stored] = (stored, gshape, offsets, local)
        for moment in MOMENTS:
            key = f"optim.{moment}/{stored}"
            wanted[key] = (key, gshape, offsets, local)
        wanted[f"optim.step/{stored}"] = (f"optim.step/{stored}", (), (), ())
    return list(wanted.values())


def restore(trainer, path) -> dict:
    """Load parameters, AdamW state, sampler position and step from any layout's checkpoint.

    Values land in place: in the parameters, and in AdamW moments made here for them.
    """
    destinations, states = {}, {}
    for name, p in trainer.named_params:
        stored = canonical_name(trainer, name)
        _, _, local = _placement(trainer, name, p)
        state = states.setdefault(id(p), {m: torch.zeros_like(p) for m in MOMENTS})
        destinations[stored] = _trim(p.detach(), local)
        for moment in MOMENTS:
            destinations[f"optim.{moment}/{stored}"] = _trim(state[moment], local)
    meta, tensors = load_checkpoint(path, _wanted(trainer), into=destinations)
    with torch.no_grad():
        for name, p in trainer.named_params:
            stored = canonical_name(trainer, name)
            _, _, local = _placement(trainer, name, p)
            # NOTE: two parameters of one rank can share a stored name (tied embeddings on
            # one stage); the load filled one of them in place, the other is copied here.
            _fill(_trim(p, local), tensors[stored])
            state = {m: states[id(p)][m] for m in MOMENTS}
            for moment in MOMENTS:
                _fill(_trim(state[moment], local), tensors[f"optim.{moment}/{stored}"])
            state["step"] = tensors[f"optim.step/{stored}"].to(torch.float32).reshape(())
            trainer.optimizer.state[p] = state
    trainer.step_index = meta["lr_schedule"]["step"]
    if trainer.sampler is not None:
        trainer.sampler.load_state_dict(meta["sampler"])
    rngs = meta.get("rng") or []
    if trainer.grid.world_rank < len(rngs):
        raw = base64.b64decode(rngs[trainer.grid.world_rank])
        torch.set_rng_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    return meta


def _fill(target: torch.Tensor, loaded: torch.Tensor) -> None:
    """Copy a loaded tensor into its destination unless it was loaded there in place."""
    if target.data_ptr() != loaded.data_ptr() or target.dtype != loaded.dtype:
        target.copy_(loaded)


def check_layout_change(saved: dict, config) -> list[str]:
    """Human-readable differences between the saved layout and this run's (for the log)."""
    now = {"dp": config.parallel.dp, "pp": config.parallel.pp, "tp": config.parallel.tp,
           "schedule": config.schedule.name, "virtual": config.schedule.virtual}  # fmt: skip
    layout = saved.get("layout", {})
    return [f"{k} {layout.get(k)} -> {v}" for k, v in now.items() if layout.get(k) != v]
