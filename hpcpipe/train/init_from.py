"""`hpcpipe train --init-from PATH`: start a run from the weights of a checkpoint or an HF folder.

PATH is an hpcpipe checkpoint (a step folder, or a run folder whose `latest` names one) or a
Hugging Face model folder (config.json + model.safetensors or model.safetensors.index.json).
The run starts at step 0 with a fresh optimizer and data order; only the weights come from
PATH. Its [model] table comes from PATH too (the manifest's config.model, or config.json through
the family's converter): keys the user also sets must agree, except model.seq_len, which may be
shorter than the position table (the whole table is loaded either way). All of that is checked
from files alone, so every rank reaches the same verdict before any communication.

Every rank then reads only the tensors its stages hold and keeps only its tensor-parallel
slice (after the family's per-tensor transform, which may need the whole tensor: GPT-2's
c_attn), cast to train.dtype; vocabulary padding rows stay zero. A tied copy loads from its
group's first member, which is what both formats store.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hpcpipe import config as cfg
from hpcpipe.checkpoint import hf, store
from hpcpipe.checkpoint.format import CheckpointError
from hpcpipe.checkpoint.manifest import read_manifest
from hpcpipe.config import Config, ConfigError
from hpcpipe.models import DEFAULT_ARCH, get_spec
from hpcpipe.parallel.tensor_parallel import shard_placement

HPCPIPE, HF = "hpcpipe checkpoint", "Hugging Face folder"
WHAT = (
    "give an hpcpipe checkpoint (a step_<N> folder, or a run folder with `latest`) or a "
    "Hugging Face model folder (config.json + model.safetensors or model.safetensors.index.json)"
)


@dataclass(frozen=True)
class Source:
    """What --init-from names: its kind, where it is, and the [model] table it records."""

    kind: str  # HPCPIPE or HF
    path: Path  # the step folder or the HF folder
    where: str  # the file the [model] values come from (for messages)
    model: dict[str, Any]  # [model] keys, arch included; seq_len is only the default


def source(path: str | Path, arch: str | None = None) -> Source:
    """Resolve PATH (ConfigError when it is missing, unreadable or not a model hpcpipe runs).

    arch: the user's model.arch, if any (an HF folder is then read by that family's converter).
    """
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"--init-from {path}: does not exist; {WHAT}")
    try:
        if hf.is_hf_folder(p):
            return _hf_source(p, arch)
        step_dir = store.resolve(p)
        manifest = read_manifest(step_dir)
    except CheckpointError as exc:  # HFError too
        raise ConfigError(f"--init-from {path}: {exc}") from None
    model = dict((manifest.get("config") or {}).get("model") or {})
    where = str(step_dir / store.MANIFEST)
    if not model:
        raise ConfigError(f"--init-from {path}: {where} records no config.model")
    model.setdefault("arch", DEFAULT_ARCH)
    return Source(HPCPIPE, step_dir, where, model)


def _hf_source(folder: Path, arch: str | None) -> Source:
    where = str(folder / hf.CONFIG)
    hf_config = hf.read_config(folder)
    arch = hf.arch_of(hf_config, where, arch)
    try:
        model = hf.converter_for(arch).config_from_hf(hf_config)
    except ValueError as exc:
        raise ConfigError(f"--init-from {where}: {exc}") from None
    hf.weight_files(folder)  # a folder without safetensors weights fails now, not later
    return Source(HF, folder, where, {**model, "arch": arch})


def _show(value) -> str:
    """A value as the user would write it in TOML (true, "gelu")."""
    try:
        return json.dumps(value)
    except TypeError:
        return repr(value)


def _build(values: dict):
    """The family's config from a [model] table (ConfigError from its validation)."""
    return cfg.model_section(values)


def _equivalent(a, b) -> bool:
    """Two model configs that build the same model (their HF config.json, where there is one)."""
    if a == b:
        return True
    if a.arch != b.arch:
        return False
    converter = get_spec(a.arch).hf_converter()
    return converter is not None and converter.config_to_hf(a) == converter.config_to_hf(b)


def model_table(src: Source, user: dict[str, Any]) -> dict[str, Any]:
    """The [model] table of a run initialised from `src`, given the keys the user set.

    The source's values win; a user key must agree with them (an equivalent spelling, e.g.
    n_kv_heads=0 for n_kv_heads=n_heads, agrees). model.seq_len is the user's when set.
    """
    merged = dict(src.model)
    if "seq_len" in user:
        merged["seq_len"] = user["seq_len"]
        if src.kind == HPCPIPE and "max_positions" in merged and not merged["max_positions"]:
            # 0 meant "seq_len rows": keep the saved table's rows for a new seq_len
            merged["max_positions"] = src.model.get("seq_len")
    base = _build(merged)
    for key, value in user.items():
        if key == "seq_len":
            continue
        if key not in merged:
            merged[key] = value  # a key the source does not record
            continue
        if value == merged[key]:
            continue
        try:
            agrees = _equivalent(_build({**merged, key: value}), base)
        except ConfigError:
            agrees = False
        if not agrees:
            raise ConfigError(
                f"model.{key}={_show(value)} from the config, {_show(merged[key])} in "
                f"{src.where}; drop model.{key} to use the value --init-from gives, or init "
                "from a model of that shape"
            )
    _build(merged)  # the user's extra keys must validate too
    return merged


def build_config(
    tables: dict[str, Any], overrides: dict[str, Any] | None, init_from: str | Path
) -> Config:
    """cfg.build_config with the [model] table taken from --init-from (see model_table)."""
    overrides = dict(overrides or {})
    table = tables.get("model", {})
    if not isinstance(table, dict):
        raise ConfigError("[model] must be a table of keys")
    user = dict(table)
    for dotted in [k for k in overrides if k.startswith("model.")]:
        user[dotted.partition(".")[2]] = overrides.pop(dotted)
    src = source(init_from, str(user["arch"]) if user.get("arch") else None)
    return cfg.build_config({**tables, "model": model_table(src, user)}, overrides)


def load_config(
    path: str | Path | None, overrides: dict[str, str] | None, init_from: str | Path
) -> Config:
    """cfg.load_config for a run started with --init-from (same files, same overrides)."""
    return build_config(cfg.read_tables(path), cfg.parse_overrides(overrides), init_from)


# ---------------------------------------------------------------- weights


def expected_tensors(model) -> dict[str, tuple[int, ...]]:
    """{global name: global shape} of every stored parameter (no tied copies), from meta layers."""
    spec = get_spec(model.arch)
    copies = {n for names in spec.tie_groups(model).values() for n in names[1:]}
    out = {}
    with torch.device("meta"):
        for index in range(spec.num_layers(model)):
            for name, p in spec.build_layer(model, index).named_parameters():
                full = f"layers.{index}.{name}"
                if full not in copies:
                    out[full] = tuple(p.shape)
    return out


def check_weights(config: Config, path: str | Path) -> int:
    """Every tensor the model needs is in PATH with its shape (headers only; ConfigError).

    Returns how many tensors the model loads. No communication: call it on every rank.
    """
    model = config.model
    src = source(path, model.arch)
    wanted = expected_tensors(model)
    try:
        if src.kind == HPCPIPE:
            _check_manifest(src, wanted)
        else:
            _check_hf(src, model, wanted)
    except CheckpointError as exc:
        raise ConfigError(f"--init-from {path}: {exc}") from None
    return len(wanted)


def _check_manifest(src: Source, wanted: dict) -> None:
    tensors = read_manifest(src.path)["tensors"]
    for name, shape in wanted.items():
        entry = tensors.get(name)
        if entry is None:
            raise CheckpointError(f"{src.where}: no tensor {name!r}")
        if tuple(entry["global_shape"]) != shape:
            raise CheckpointError(
                f"{src.where}: tensor {name} has shape {tuple(entry['global_shape'])}, the "
                f"model needs {shape}"
            )


def _check_hf(src: Source, model, wanted: dict) -> None:
    converter = hf.converter_for(model.arch)
    names = converter.hf_names(model)
    with hf.SafetensorsFolder(src.path, getattr(converter, "base_prefix", "")) as folder:
        for name, shape in wanted.items():
            if name not in names:
                raise CheckpointError(f"the {model.arch} converter has no HF name for {name}")
            stored_shape, _ = folder.info(names[name])
            probe = torch.empty(stored_shape, device="meta")
            try:
                got = tuple(converter.from_hf(name, probe, model).shape)
            except RuntimeError as exc:
                got = f"{stored_shape} (unconvertible: {exc})"
            if got != shape:
                raise CheckpointError(
                    f"{src.path}: tensor {names[name]} has shape {stored_shape}, which gives "
                    f"{got} for {name}; the model needs {shape}"
                )


def _fill(param: torch.Tensor, value: torch.Tensor, local: tuple) -> None:
    """Copy `value` (the real local slice) into param (cast, moved); padding rows zero."""
    with torch.no_grad():
        target = param
        for dim, n in enumerate(local):
            target = target.narrow(dim, 0, n)
        target.copy_(value)
        for dim, n in enumerate(local):
            if n < param.shape[dim]:
                param.narrow(dim, n, param.shape[dim] - n).zero_()


def load_weights(named_params, canonical: dict, tp_specs: dict, model, path) -> int:
    """Fill parameters from PATH; returns how many distinct tensors this process read.

    named_params: (global name, parameter) pairs; canonical: tied copy -> the name it is stored
    under; tp_specs: {global name: (dim, offset, global size)} of tensor-parallel shards.
    """
    src = source(path, model.arch)
    places = []
    for name, p in named_params:
        stored = canonical.get(name, name)
        places.append((p, stored, *shard_placement(p, tp_specs.get(name))))
    try:
        if src.kind == HPCPIPE:
            wanted = list({(s, g, o, loc) for _, s, g, o, loc in places})
            _, tensors = store.load_checkpoint(src.path, wanted)
            for p, stored, _, _, local in places:
                _fill(p, tensors[stored], local)
            return len(tensors)
        return _load_hf(src, model, places)
    except CheckpointError as exc:
        raise ConfigError(f"--init-from {path}: {exc}") from None


def _load_hf(src: Source, model, places) -> int:
    converter = hf.converter_for(model.arch)
    names = converter.hf_names(model)
    seen = set()
    with hf.SafetensorsFolder(src.path, getattr(converter, "base_prefix", "")) as folder:
        for p, stored, gshape, offsets, local in places:
            full = converter.from_hf(stored, folder.get(names[stored]), model)
            if tuple(full.shape) != gshape:
                raise CheckpointError(
                    f"{src.path}: tensor {names[stored]} gives shape {tuple(full.shape)} for "
                    f"{stored}; the model needs {gshape}"
                )
            piece = full
            for dim, (o, n) in enumerate(zip(offsets, local, strict=True)):
                piece = piece.narrow(dim, o, n)
            _fill(p, piece, local)
            seen.add(stored)
            del full, piece  # one whole tensor in memory at a time
    return len(seen)


def load_into(trainer, path: str | Path) -> int:
    """Load PATH's weights into a PipelineTrainer's parameters (this rank's share only).

    Returns the number of tensors the whole model loads (the same on every rank).
    """
    # NOTE: loaded in full precision and handed to the master weights, so a 16-bit run starts
    # from the source's values rather than from their 16-bit rounding.
    dtype = trainer.master.fragments[0].master.dtype if trainer.master.fragments else None
    full = [(n, torch.zeros_like(p, dtype=dtype)) for n, p in trainer.named_params]
    load_weights(full, trainer.canonical, trainer.tp_specs, trainer.config.model, path)
    values = {id(p): t for (_, p), (_, t) in zip(trainer.named_params, full, strict=True)}
    trainer.master.load_values(values)
    trainer.sync_versions()  # 2BW: W(-1) = W(0) = the loaded weights
    return len(expected_tensors(trainer.config.model))


def load_into_model(model_module, model_config, path: str | Path) -> int:
    """Load PATH's weights into a whole model on one process (api.build_model's Stage).

    The serial path: no tensor parallelism, tied copies shared or loaded from their source.
    """
    spec = get_spec(model_config.arch)
    canonical = {n: names[0] for names in spec.tie_groups(model_config).values() for n in names[1:]}
    named = list(model_module.named_parameters())
    return load_weights(named, canonical, {}, model_config, path)
