"""Hugging Face model folders: config.json, safetensors weights (one file or sharded), export.

A folder `save_pretrained` writes holds config.json and either model.safetensors or
model.safetensors.index.json ({"weight_map": {tensor name: shard file}}) with its shards.
Reading is lazy: a shard's header is read when the folder is opened, a tensor's bytes only
when it is asked for (safetensors maps the file), so a rank reads only the tensors it holds.

What a family's weights are called there and how they are laid out is its converter's business
(`ModelSpec.hf`, found through hpcpipe.models.get_spec): nothing here imports a model family.
A converter has `model_type` (config.json's), `architectures`, optionally `base_prefix` (the
prefix a base-model folder lacks, e.g. "transformer."), and config_from_hf, config_to_hf,
hf_names, to_hf and from_hf (see hpcpipe/models/gpt2/hf.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from hpcpipe.checkpoint import store
from hpcpipe.checkpoint.format import CheckpointError
from hpcpipe.models import BUILTIN, DEFAULT_ARCH, UnknownModelError, get_spec

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
# 5 GB shards as transformers' save_pretrained made them for years; most readers expect files
# well under their memory
MAX_SHARD_BYTES = 5 * 1000**3

# safetensors' dtype codes
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
}
DTYPE_NAMES = {
    torch.float64: "float64",
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
}


class HFError(CheckpointError):
    """A Hugging Face folder that hpcpipe cannot read, or a model it cannot write as one."""


def is_hf_folder(path: str | Path) -> bool:
    """A folder with config.json (and no hpcpipe manifest)."""
    path = Path(path)
    return (path / CONFIG).is_file() and not (path / store.MANIFEST).is_file()


def read_config(folder: str | Path) -> dict:
    """config.json of a folder, as a dict."""
    path = Path(folder) / CONFIG
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise HFError(f"{path} does not exist (not a Hugging Face model folder)") from None
    except (OSError, ValueError) as exc:
        raise HFError(f"{path}: unreadable ({exc})") from None
    if not isinstance(value, dict):
        raise HFError(f"{path}: not a JSON object")
    return value


def converter_for(arch: str):
    """The Hugging Face converter of model.arch (HFError when the family has none)."""
    try:
        spec = get_spec(arch)
    except UnknownModelError as exc:
        raise HFError(str(exc)) from None
    converter = spec.hf_converter()
    if converter is None:
        raise HFError(f"model.arch={arch!r} has no Hugging Face converter (its ModelSpec.hf)")
    return converter


def arch_of(hf_config: dict, where: str, arch: str | None = None) -> str:
    """The model.arch of a config.json: the built-in family whose converter has its model_type.

    `arch` (a user's model.arch) is checked instead when given: its converter must take it.
    """
    model_type = hf_config.get("model_type")
    found = hf_config.get("architectures") or []
    candidates = [arch] if arch else list(BUILTIN)
    for name in candidates:
        converter = converter_for(name) if arch else get_spec(name).hf_converter()
        if converter is None:
            continue
        if model_type == converter.model_type or (
            model_type is None and set(found) & set(converter.architectures)
        ):
            return name
    if arch:
        raise HFError(
            f"{where}: model_type {model_type!r} (architectures {found}) is not what "
            f"model.arch={arch!r} reads ({converter_for(arch).model_type!r}); drop model.arch "
            "to take the family from config.json"
        )
    known = [
        f"{n} ({c.model_type})" for n in BUILTIN if (c := get_spec(n).hf_converter()) is not None
    ]
    raise HFError(
        f"{where}: model_type {model_type!r} (architectures {found}) is no family hpcpipe "
        f"converts; supported: {', '.join(known)}"
    )


def weight_files(folder: str | Path) -> dict[str, Path]:
    """{tensor name: file} of a folder's safetensors weights (one file, or an index)."""
    folder = Path(folder)
    if (folder / INDEX).is_file():
        try:
            weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise HFError(f"{folder / INDEX}: unreadable index ({exc!r})") from None
        return {name: folder / file for name, file in weight_map.items()}
    if (folder / WEIGHTS).is_file():
        return {name: folder / WEIGHTS for name in _open(folder / WEIGHTS).keys()}  # noqa: SIM118
    others = sorted(p.name for p in folder.glob("*.bin")) + sorted(
        p.name for p in folder.glob("*.pt")
    )
    hint = (
        f" (it has {', '.join(others)}: PyTorch pickles are not read; re-save with "
        "save_pretrained(..., safe_serialization=True))"
        if others
        else ""
    )
    raise HFError(f"{folder}: neither {WEIGHTS} nor {INDEX}{hint}")


def _open(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt")
    except FileNotFoundError:
        raise HFError(f"{path}: shard file missing") from None
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise HFError(f"{path}: not a readable safetensors file ({exc})") from None


class SafetensorsFolder:
    """The tensors of a Hugging Face folder, read one at a time on demand.

    `prefix` is the converter's base_prefix: a name not found as given is looked up without
    it too (a GPT2Model / LlamaModel folder, or GPT-2's original "h.0..." names).
    """

    def __init__(self, folder: str | Path, prefix: str = ""):
        self.folder = Path(folder)
        self.files = weight_files(self.folder)
        self.prefix = prefix
        self._handles: dict[Path, object] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handles.clear()

    def _handle(self, file: Path):
        if file not in self._handles:
            self._handles[file] = _open(file)
        return self._handles[file]

    def find(self, name: str) -> str | None:
        """The stored name of tensor `name` (None when the folder has no such tensor)."""
        if name in self.files:
            return name
        if self.prefix and name.startswith(self.prefix) and name[len(self.prefix) :] in self.files:
            return name[len(self.prefix) :]
        return None

    def _stored(self, name: str) -> str:
        stored = self.find(name)
        if stored is None:
            raise HFError(f"{self.folder}: no tensor {name!r} in the weights")
        return stored

    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """(shape, dtype) of a tensor from its file's header (no data read)."""
        stored = self._stored(name)
        piece = self._handle(self.files[stored]).get_slice(stored)
        code = piece.get_dtype()
        if code not in _DTYPES:
            raise HFError(
                f"{self.files[stored]}: tensor {stored!r} has dtype {code}; hpcpipe reads "
                f"{', '.join(_DTYPES)} weights"
            )
        return tuple(piece.get_shape()), _DTYPES[code]

    def get(self, name: str) -> torch.Tensor:
        """Tensor `name` as stored (its dtype, on the CPU)."""
        stored = self._stored(name)
        self.info(stored)
        return self._handle(self.files[stored]).get_tensor(stored)


def write_folder(
    out: str | Path,
    tensors: dict[str, torch.Tensor],
    config_json: dict,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    metadata: dict[str, str] | None = None,
) -> list[Path]:
    """Write config.json and the tensors as model.safetensors (or shards + index); the files."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name].detach().cpu().contiguous()
        size += nbytes
    meta = {"format": "pt", **(metadata or {})}
    written = []
    if len(shards) == 1:
        names = [WEIGHTS]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards, strict=True):
        save_file(shard, str(out / name), metadata=meta)
        written.append(out / name)
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {
            "metadata": {"total_size": total},
            "weight_map": {t: n for n, s in zip(names, shards, strict=True) for t in s},
        }
        _write_json(out / INDEX, index)
        written.append(out / INDEX)
    elif (out / INDEX).exists():
        (out / INDEX).unlink()  # a stale index would win over model.safetensors
    _write_json(out / CONFIG, config_json)
    written.append(out / CONFIG)
    return written


def _write_json(path: Path, value) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def model_config_of(manifest: dict, where: str):
    """The model config object recorded in an hpcpipe manifest (config -> model)."""
    values = dict((manifest.get("config") or {}).get("model") or {})
    if not values:
        raise HFError(f"{where}: the manifest records no config.model")
    arch = values.get("arch") or DEFAULT_ARCH
    try:
        cls = get_spec(arch).config_class
    except UnknownModelError as exc:
        raise HFError(f"{where}: {exc}") from None
    try:
        return cls(**{**values, "arch": arch})
    except (TypeError, ValueError) as exc:
        raise HFError(f"{where}: config.model does not build a {cls.__name__} ({exc})") from None


def export(
    path: str | Path,
    out: str | Path,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> tuple[dict, int]:
    """Write an hpcpipe checkpoint as a Hugging Face folder; (manifest, tensors written).

    dtype: cast every tensor (None keeps the dtype they were saved in). A tied copy is not in
    the checkpoint, so it is not written: config.json says tie_word_embeddings instead.
    """
    step_dir = store.resolve(path)
    manifest, tensors = store.full_tensors(step_dir, keep=lambda n: not n.startswith("optim."))
    where = str(step_dir / store.MANIFEST)
    model = model_config_of(manifest, where)
    converter = converter_for(model.arch)
    names = converter.hf_names(model)
    out_tensors = {}
    for name, tensor in tensors.items():
        if name not in names:
            raise HFError(
                f"{where}: tensor {name!r} has no Hugging Face name in the {model.arch} converter"
            )
        converted = converter.to_hf(name, tensor, model)
        out_tensors[names[name]] = converted.to(dtype) if dtype is not None else converted
    dtypes = {t.dtype for t in out_tensors.values()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in DTYPE_NAMES:
        raise HFError(f"{where}: tensors of dtypes {sorted(map(str, dtypes))}; pick one with dtype")
    config_json = converter.config_to_hf(model, dtype=DTYPE_NAMES[dtypes.pop()])
    metadata = {"hpcpipe_step": str(manifest["step"]), "hpcpipe_checkpoint": str(step_dir)}
    write_folder(out, out_tensors, config_json, max_shard_bytes, metadata)
    return manifest, len(out_tensors)
