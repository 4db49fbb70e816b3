"""A trainer's state as checkpoint shards keyed by GLOBAL names, and back onto any layout.

Master weights and AdamW moments are saved under the parameter's global name (moments prefixed
`optim.exp_avg/`, `optim.exp_avg_sq/`, `optim.step/`), with the slice a tensor-parallel rank
holds; under ZeRO each dp rank writes the flat range it owns, as boxes of the global tensor.
A 16-bit run saves its float32 masters (the 16-bit parameters are derived from them). A tied
copy is never saved: it is its group's first member, and it loads from there.

PipeDream-2BW (schedule.name = "2bw") also saves the weight version the next batch runs on,
W(t-1) beside the masters' W(t), under `stale/` + the name, in the parameters' dtype: a resume
recomputes that batch's first forwards on it, so it continues exactly.
"""

from __future__ import annotations

import base64
import math

import torch

from hpcpipe import config as cfg
from hpcpipe import tokenizer
from hpcpipe.checkpoint.format import Shard
from hpcpipe.checkpoint.manifest import read_manifest
from hpcpipe.checkpoint.store import load_checkpoint, resolve, save_checkpoint
from hpcpipe.parallel.tensor_parallel import shard_placement

MOMENTS = ("exp_avg", "exp_avg_sq")
STALE = "stale/"  # 2BW: the in-flight weight version, W(t-1)


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


def flat_boxes(shape, start: int, stop: int) -> list[tuple[tuple, tuple]]:
    """The flat range [start, stop) of a C-ordered tensor of `shape` as boxes (offsets, shape),
    each one contiguous and in order (at most 2 per dimension), so a ZeRO fragment can be saved
    as ordinary pieces of the global tensor."""
    if start >= stop:
        return []
    if len(shape) <= 1:
        return [((start,), (stop - start,))] if shape else [((), ())]
    inner = math.prod(shape[1:])
    first, last = start // inner, (stop - 1) // inner
    if first == last:
        rest = flat_boxes(shape[1:], start - first * inner, stop - first * inner)
        return [((first, *o), (1, *n)) for o, n in rest]
    out = []
    if start % inner:
        rest = flat_boxes(shape[1:], start % inner, inner)
        out += [((first, *o), (1, *n)) for o, n in rest]
        first += 1
    full_end = stop // inner
    if full_end > first:
        out.append(((first,) + (0,) * (len(shape) - 1), (full_end - first, *shape[1:])))
    if stop % inner:
        rest = flat_boxes(shape[1:], 0, stop % inner)
        out += [((full_end, *o), (1, *n)) for o, n in rest]
    return out


def fragment_pieces(flat: torch.Tensor, shape, start: int, stop: int, real_shape):
    """(offsets, tensor) boxes of a fragment's values, cut to the real (unpadded) local shape."""
    out, pos = [], 0
    for offsets, box in flat_boxes(tuple(shape), start, stop):
        n = math.prod(box)
        piece = flat[pos : pos + n].view(box)
        pos += n
        for dim, (o, size) in enumerate(zip(offsets, box, strict=True)):
            piece = piece.narrow(dim, 0, max(0, min(size, real_shape[dim] - o)))
        if piece.numel():
            out.append((offsets, piece))
    return out


def shards(trainer) -> list[Shard]:
    """Every tensor this rank owns: the master weights (never a 16-bit copy), AdamW moments and
    step counts of its fragments (whole parameters, or under ZeRO its 1/dp flat ranges)."""
    out, stale = [], in_flight_version(trainer)
    for f in trainer.master.fragments:
        name = f.name
        if canonical_name(trainer, name) != name:
            continue  # a tied copy: saved as its group's first member
        gshape, offsets, local = _placement(trainer, name, f.param)
        state = trainer.master.state_of(f)
        values = {name: f.master}
        values.update({f"optim.{m}/{name}": state[m] for m in MOMENTS if m in state})
        if stale is not None:
            values[STALE + name] = stale[name].detach().reshape(-1)[f.start : f.stop]
        for key, flat in values.items():
            for box_offsets, piece in fragment_pieces(flat, f.param.shape, f.start, f.stop, local):
                where = tuple(o + b for o, b in zip(offsets, box_offsets, strict=True))
                out.append(Shard(key, piece.detach(), gshape, where))
        if "step" in state:
            out.append(Shard(f"optim.step/{name}", state["step"].reshape(()), (), ()))
    return out


def in_flight_version(trainer) -> dict[str, torch.Tensor] | None:
    """2BW: {global name: parameter} of the version the next step's batch runs on (None
    for every other schedule)."""
    if trainer.versions is None:
        return None
    from hpcpipe.train.trainer import unique_named_parameters

    return dict(unique_named_parameters(trainer.versions[trainer.step_index % 2]))


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
        "loss_scaler": trainer.master.scaler.state_dict(),
        "rng": [g["rng"] for g in gathered],
    }  # fmt: skip


def save(trainer, root) -> str:
    """Collective: write this step's checkpoint under root; return the step directory.

    A run on a dataset with a subword tokenizer commits its tokenizer.json with the step
    (rank 0 reads it from the dataset; the manifest records its sha256).
    """
    g = trainer.grid
    zero = trainer.config.parallel.zero and trainer.config.parallel.dp > 1
    meta, files = manifest(trainer), {}
    if g.cart.Get_rank() == 0:  # only the leader's manifest and files are written
        data_path = trainer.config.data.path or None
        record = tokenizer.checkpoint_record(data_path)
        if record is not None:
            meta["tokenizer"] = record
            files = tokenizer.checkpoint_files(data_path)
    path = save_checkpoint(
        root,
        trainer.step_index,
        g.cart,
        shards(trainer),
        writer=zero or g.dp_rank == 0,  # ZeRO: each dp rank writes the shard it owns
        position=f"pp{g.pp_rank}_tp{g.tp_rank}" + (f"_dp{g.dp_rank}" if zero else ""),
        manifest=meta,
        keep=trainer.config.checkpoint.keep,
        timeout=trainer.config.parallel.timeout,
        on_dataset=_fault_hook(trainer),
        files=files,
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


def _wanted(trainer, stale: bool = False) -> list[tuple]:
    """(stored name, global shape, offsets, local shape) for every tensor this rank needs
    (stale: 2BW's in-flight version too)."""
    wanted = {}
    for f in trainer.master.fragments:
        stored = canonical_name(trainer, f.name)
        gshape, offsets, local = _placement(trainer, f.name, f.param)
        wanted[stored] = (stored, gshape, offsets, local)
        for moment in MOMENTS:
            key = f"optim.{moment}/{stored}"
            wanted[key] = (key, gshape, offsets, local)
        wanted[f"optim.step/{stored}"] = (f"optim.step/{stored}", (), (), ())
    for name, param in (in_flight_version(trainer) or {}).items() if stale else ():
        key = STALE + canonical_name(trainer, name)  # whole local tensors, ZeRO or not
        wanted[key] = (key, *_placement(trainer, name, param))
    return list(wanted.values())


def _flat_range(loaded: torch.Tensor, f, local, dtype) -> torch.Tensor:
    """A fragment's range of a loaded local piece (padding rows, if any, are zero)."""
    full = torch.zeros(f.param.shape, dtype=dtype, device=f.master.device)
    _trim(full, local).copy_(loaded)
    return full.reshape(-1)[f.start : f.stop]


def _whole(f, local) -> bool:
    """Whether a fragment is its whole local parameter, unpadded (loadable in place)."""
    return f.start == 0 and f.stop == f.param.numel() and tuple(local) == tuple(f.param.shape)


def _destinations(trainer) -> tuple[dict, dict]:
    """Where a load can write straight from the file, as torch.distributed.checkpoint does:
    whole-parameter fragments (no ZeRO) receive their masters and new AdamW moments in place.
    Returns ({stored name: tensor}, {id(fragment): moments made for it})."""
    into, moments = {}, {}
    for f in trainer.master.fragments:
        stored = canonical_name(trainer, f.name)
        _, _, local = _placement(trainer, f.name, f.param)
        made = {m: torch.zeros_like(f.master) for m in MOMENTS}
        moments[id(f)] = made
        if not _whole(f, local) or stored in into:
            continue
        into[stored] = f.master.view(f.param.shape)
        for m in MOMENTS:
            into[f"optim.{m}/{stored}"] = made[m].view(f.param.shape)
    return into, moments


def _take(target: torch.Tensor, loaded: torch.Tensor, f, local) -> None:
    """Fill a fragment's flat tensor from a loaded piece, unless the load wrote it in place."""
    if loaded.data_ptr() == target.data_ptr() and loaded.dtype == target.dtype:
        return
    target.copy_(_flat_range(loaded, f, local, target.dtype))


def restore(trainer, path, derive: bool = True) -> dict:
    """Load master weights, AdamW state, sampler position and step from any layout's
    checkpoint (any dp, pp, tp, zero); the model parameters are derived from the masters.

    derive=False loads without communicating (the ranks agree on the outcome first); then
    call derive_params (collective under ZeRO: an all-gather) once every rank has loaded.
    """
    into, moments = _destinations(trainer)
    stale = trainer.versions is not None and _has_stale(path)
    meta, tensors = load_checkpoint(path, _wanted(trainer, stale), into=into)
    with torch.no_grad():
        for f in trainer.master.fragments:
            stored = canonical_name(trainer, f.name)
            _, _, local = _placement(trainer, f.name, f.param)
            _take(f.master, tensors[stored], f, local)
            state = moments[id(f)]
            for m in MOMENTS:
                _take(state[m], tensors[f"optim.{m}/{stored}"], f, local)
            state["step"] = tensors[f"optim.step/{stored}"].to(torch.float32).reshape(())
            trainer.master.set_state(f, state)
    trainer.loaded_stale = {k[len(STALE) :]: v for k, v in tensors.items() if k.startswith(STALE)}
    trainer.step_index = meta["lr_schedule"]["step"]  # before derive: 2BW's version by step
    if derive:
        derive_params(trainer)
    trainer.master.scaler.load_state_dict(meta.get("loss_scaler"))
    if trainer.sampler is not None:
        trainer.sampler.load_state_dict(meta["sampler"])
    rngs = meta.get("rng") or []
    if trainer.grid.world_rank < len(rngs):
        raw = base64.b64decode(rngs[trainer.grid.world_rank])
        torch.set_rng_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    return meta


def _has_stale(path) -> bool:
    """Whether a checkpoint holds 2BW's in-flight version (a 2bw run saved it)."""
    return any(name.startswith(STALE) for name in read_manifest(resolve(path))["tensors"])


def derive_params(trainer) -> None:
    """The model parameters from the restored masters (cast; all-gathered under ZeRO); 2BW:
    both weight versions from them, the in-flight one from its saved values when there are
    some (else W(t-1) = W(t), as a fresh run starts)."""
    trainer.master.refresh_params()
    if trainer.versions is None:
        return
    trainer.sync_versions()
    loaded, trainer.loaded_stale = getattr(trainer, "loaded_stale", None) or {}, None
    if not loaded:
        return
    with torch.no_grad():
        for name, param in in_flight_version(trainer).items():
            stored = canonical_name(trainer, name)
            _, _, local = _placement(trainer, name, param)
            _trim(param, local).copy_(loaded[stored])


def check_layout_change(saved: dict, config) -> list[str]:
    """Human-readable differences between the saved layout and this run's (for the log)."""
    now = {"dp": config.parallel.dp, "pp": config.parallel.pp, "tp": config.parallel.tp,
           "schedule": config.schedule.name, "virtual": config.schedule.virtual}  # fmt: skip
    layout = saved.get("layout", {})
    return [f"{k} {layout.get(k)} -> {v}" for k, v in now.items() if layout.get(k) != v]
