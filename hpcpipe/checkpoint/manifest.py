"""The manifest of one checkpoint step: every tensor's global shape, dtype and pieces.

manifest.json = the trainer's manifest + format, format_version, tensors (global shape, dtype,
pieces: file, dataset, offsets, shape, byte offset, xxh3_64) and files. Built by rank 0 from
every writer's records; a tensor whose pieces leave a gap or overlap is refused.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from hpcpipe.checkpoint import checksum
from hpcpipe.checkpoint.format import (
    DTYPES_BY_NAME,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    READABLE_VERSIONS,
    RESERVED,
    CheckpointError,
    CheckpointMismatch,
    Shard,
    check_shard,
)


def _boxes_overlap(a: dict, b: dict) -> bool:
    """Whether two saved pieces share an element."""
    return all(
        oa < ob + nb and ob < oa + na
        for oa, na, ob, nb in zip(a["offsets"], a["shape"], b["offsets"], b["shape"], strict=True)
    )


def coverage_problem(name: str, entry: dict) -> str | None:
    """Why the pieces of one tensor do not tile it exactly once (identical copies allowed)."""
    unique = {(tuple(p["offsets"]), tuple(p["shape"])): p for p in entry["pieces"]}
    pieces = list(unique.values())
    for i, a in enumerate(pieces):
        for b in pieces[i + 1 :]:
            if _boxes_overlap(a, b) and math.prod(a["shape"]) and math.prod(b["shape"]):
                return (
                    f"{name}: saved pieces at offsets {a['offsets']} ({a['file']}) and "
                    f"{b['offsets']} ({b['file']}) overlap"
                )
    total = sum(math.prod(p["shape"]) for p in pieces)
    if total != math.prod(entry["global_shape"]):
        return (
            f"{name}: saved pieces hold {total} of the {math.prod(entry['global_shape'])} "
            f"elements of global shape {entry['global_shape']} (a piece was not saved)"
        )
    return None


def build_manifest(manifest: dict, step: int, records: list[dict]) -> dict:
    """The trainer's manifest plus the tensors' layout; raises if the pieces do not tile."""
    clash = [k for k in RESERVED if k in manifest]
    if clash or manifest.get("step", step) != step:
        raise CheckpointError(f"the trainer's manifest may not set {clash or ['step']} itself")
    tensors: dict[str, dict] = {}
    for r in records:
        entry = tensors.setdefault(
            r["name"], {"global_shape": r["global_shape"], "dtype": r["dtype"], "pieces": []}
        )
        if (entry["global_shape"], entry["dtype"]) != (r["global_shape"], r["dtype"]):
            raise CheckpointError(
                f"{r['name']}: {r['file']} saves global shape {r['global_shape']} {r['dtype']}, "
                f"another position {entry['global_shape']} {entry['dtype']}"
            )
        keys = ("file", "dataset", "offsets", "shape", "byte_offset", checksum.WRITTEN)
        piece = {k: r[k] for k in keys if k in r}
        entry["pieces"].append(piece)
    for name, entry in tensors.items():
        problem = coverage_problem(name, entry)
        if problem:
            raise CheckpointError(problem)
    files = sorted({r["file"] for r in records})
    return {
        **manifest,
        "step": step,
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "files": files,
        "tensors": dict(sorted(tensors.items())),
    }


def write_json(path: Path, obj) -> None:
    """Write JSON durably: write, flush, fsync."""
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def read_manifest(step_dir: str | Path) -> dict:
    """The manifest of a step directory (CheckpointError when missing or unreadable)."""
    path = Path(step_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no manifest (not a committed checkpoint)") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an hpcpipe checkpoint manifest")
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{path}: format_version {manifest.get('format_version')}, this hpcpipe reads "
            f"{' and '.join(map(str, READABLE_VERSIONS))} (a newer hpcpipe wrote it: upgrade)"
        )
    return manifest


# ---------------------------------------------------------------- run directories


def check_wanted(step_dir: Path, manifest: dict, name: str, gshape, offsets, shape) -> dict:
    """The tensor's manifest entry, after checking the wanted slice against it."""
    entry = manifest["tensors"].get(name)
    if entry is None:
        raise CheckpointMismatch(f"{step_dir}: no tensor {name!r} in the checkpoint")
    if list(entry["global_shape"]) != list(gshape):
        raise CheckpointMismatch(
            f"{step_dir}: tensor {name}: saved global shape {tuple(entry['global_shape'])}, "
            f"wanted {tuple(gshape)}"
        )
    if entry.get("dtype") not in DTYPES_BY_NAME:
        raise CheckpointError(f"{step_dir}: tensor {name}: unknown dtype {entry.get('dtype')!r}")
    probe = Shard(name, torch.empty(tuple(shape), device="meta"), tuple(gshape), tuple(offsets))
    check_shard(probe)
    return entry
