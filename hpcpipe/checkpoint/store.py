"""Sharded HDF5 checkpoints keyed by GLOBAL tensor names: any layout can load any checkpoint.

On disk (one run root, e.g. checkpoints/<run>/):

    latest                 "step_<N>\\n": the last committed step (written last, atomically)
    step_<N>/manifest.json trainer's manifest + format_version, tensors (global shape, dtype,
                           pieces: file, dataset, offsets, shape, xxh3_64), files
    step_<N>/<position>.h5 one file per (pp, tp) position, written by its dp_rank 0 replica
    .tmp_step_<N>/         a save in progress (or one that crashed): ignored, removed by the next
    .trash_step_<N>/       an old step being pruned (renamed first, so pruning is atomic too)

Inside a shard file every tensor piece is one dataset at the file's root, named by its global
name with "%" -> "%25" and "/" -> "%2F" (so "optim.exp_avg/layers.3.w" stays one dataset, not a
group); `h5ls -r` / `h5dump` read them as they are. Attributes: name (the global name),
global_shape, offsets, dtype (torch dtype, e.g. "bfloat16") and xxh3_64 (of the dataset's
little-endian bytes; format version 1 recorded sha256 instead, still read: see checksum.py).
bfloat16 has no HDF5/numpy type: it is stored as its uint16 bit patterns.

Commit protocol (save_checkpoint): writers write .tmp_step_<N>/<position>.h5 and fsync; barrier;
rank 0 writes manifest.json, fsyncs, renames the directory to step_<N>, fsyncs the root, then
replaces `latest`, then prunes. A crash at any point leaves the previous step loadable. Every
wait is a non-blocking barrier polled with sleeps (p2p.wait_politely), with a deadline.

Parallel HDF5: the PyPI h5py is a serial build (h5py.get_config().mpi is False), so hpcpipe always
writes one file per position, which is also what a parallel build gets: one-file-per-position
needs no collective I/O and loads into any layout. A single shared file written with
driver="mpio" is not implemented; with a parallel build (conda-forge `h5py=*=mpi_openmpi*`
against the same MPI as mpi4py) the per-position files work unchanged.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import re
import shutil
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from hpcpipe.checkpoint import checksum
from hpcpipe.parallel.p2p import wait_politely

FORMAT = "hpcpipe-checkpoint"
FORMAT_VERSION = 2  # 2: XXH3-64 per piece instead of SHA-256
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
LATEST = "latest"
STEP_RE = re.compile(r"^step_(\d+)$")
RESERVED = ("format", "format_version", "tensors", "files")

# numpy storage type per torch dtype; bfloat16 travels as its bit patterns.
_STORAGE = {
    torch.float64: np.float64,
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.bfloat16: np.uint16,
    torch.int64: np.int64,
    torch.int32: np.int32,
    torch.int16: np.int16,
    torch.int8: np.int8,
    torch.uint8: np.uint8,
    torch.bool: np.bool_,
}


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupt or does not fit what is asked of it."""


@dataclass(frozen=True)
class Shard:
    """This rank's piece of one global tensor."""

    name: str
    tensor: torch.Tensor
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32."""
    return str(dtype).removeprefix("torch.")


_BY_NAME = {dtype_name(d): d for d in _STORAGE}


def dataset_name(name: str) -> str:
    """HDF5 dataset name for a global tensor name ('/' escaped so no group is created)."""
    return name.replace("%", "%25").replace("/", "%2F")


# ---------------------------------------------------------------- tensors <-> arrays


def to_array(tensor: torch.Tensor) -> np.ndarray:
    """Host, contiguous, little-endian numpy copy of a tensor (bf16 as uint16 bits)."""
    if tensor.dtype not in _STORAGE:
        supported = ", ".join(sorted(_BY_NAME))
        raise CheckpointError(f"cannot checkpoint dtype {tensor.dtype}; supported: {supported}")
    t = tensor.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16).astype("<u2", copy=False)
    # NOTE: not np.ascontiguousarray: it turns a 0-d array (a scalar tensor) into shape (1,).
    arr = t.numpy()
    return arr.astype(arr.dtype.newbyteorder("<"), copy=False)


def digest_of(arr: np.ndarray) -> str:
    """The checksum new checkpoints record for an array's stored bytes."""
    return checksum.compute(checksum.WRITTEN, arr)


# ---------------------------------------------------------------- writing one position's file


def check_shard(shard: Shard) -> None:
    """Refuse a shard whose piece does not fit inside its global tensor."""
    shape, gshape, offsets = tuple(shard.tensor.shape), shard.global_shape, shard.offsets
    if not shard.name:
        raise CheckpointError("a shard has an empty name")
    if not len(shape) == len(gshape) == len(offsets):
        raise CheckpointError(
            f"{shard.name}: piece shape {shape}, global shape {gshape} and offsets {offsets} "
            "must have the same number of dims"
        )
    for dim, (n, g, o) in enumerate(zip(shape, gshape, offsets, strict=True)):
        if o < 0 or o + n > g:
            raise CheckpointError(
                f"{shard.name}: piece {shape} at offsets {offsets} does not fit in the global "
                f"shape {gshape} (dim {dim})"
            )


def _write_dataset(f: h5py.File, shard: Shard, file_name: str) -> dict:
    """Write one piece with its attributes; return its manifest record.

    NOTE: the checksum is computed inline: at XXH3's ~22 GB/s a helper thread saved nothing,
    and handing pieces to one cost more in GIL hand-overs than the hash itself.
    """
    arr = to_array(shard.tensor)
    digest = digest_of(arr)
    ds = f.create_dataset(dataset_name(shard.name), data=arr)
    ds.attrs["name"] = shard.name
    ds.attrs["global_shape"] = np.asarray(shard.global_shape, dtype=np.int64)
    ds.attrs["offsets"] = np.asarray(shard.offsets, dtype=np.int64)
    ds.attrs["dtype"] = dtype_name(shard.tensor.dtype)
    ds.attrs[checksum.WRITTEN] = digest
    return {
        # NOTE: where the bytes lie in the file, so a load can read them without opening the
        # dataset through HDF5 (contiguous datasets only; None for empty ones).
        "byte_offset": ds.id.get_offset(),
        "name": shard.name,
        "global_shape": list(shard.global_shape),
        "dtype": dtype_name(shard.tensor.dtype),
        "file": file_name,
        "dataset": dataset_name(shard.name),
        "offsets": list(shard.offsets),
        "shape": list(shard.tensor.shape),
        checksum.WRITTEN: digest,
    }


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (so a rename inside it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _libc_sync_file_range():
    """Linux's sync_file_range(2), or None where libc lacks it (macOS)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


_SYNC_FILE_RANGE = _libc_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # start writing the dirty pages out; do not wait


def start_writeback(fd: int) -> None:
    """Have the kernel start writing a file's dirty pages to disk now, without waiting.

    NOTE: called after each dataset, so the disk works while the next one is written and the
    closing fsync finds little left to do (the trick RocksDB's bytes_per_sync plays).
    """
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)  # a hint: failure costs nothing


def write_shard_file(
    directory: str | Path, position: str, shards: list[Shard], on_dataset=None
) -> list[dict]:
    """Write <directory>/<position>.h5 (flushed, fsynced); return the pieces' manifest records.

    on_dataset(name) runs after each dataset (fault injection: die in the middle of a write).
    """
    if not shards:
        return []  # a position with nothing to save leaves no file
    names = [s.name for s in shards]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise CheckpointError(f"position {position}: tensors given twice: {dup}")
    for shard in shards:
        check_shard(shard)
    file_name = f"{position}.h5"
    path = Path(directory) / file_name
    with h5py.File(path, "w") as f:
        records, fd = [], f.id.get_vfd_handle()
        for shard in shards:
            records.append(_write_dataset(f, shard, file_name))
            start_writeback(fd)
            if on_dataset is not None:
                on_dataset(shard.name)
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["position"] = position
        f.flush()
    fsync_path(path)
    return records


# ---------------------------------------------------------------- manifest


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


def list_steps(run_root: str | Path) -> list[tuple[int, Path]]:
    """Committed step directories (step_<N>) of one run, oldest first; tmp dirs are ignored."""
    root = Path(run_root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_RE.match(p.name))]
    return sorted(s for s in found if s[1].is_dir())


def list_runs(root_dir: str | Path) -> list[Path]:
    """Run roots under root_dir (directories with a step_<N> or a `latest`), sorted."""
    root = Path(root_dir)
    if not root.is_dir():
        return []
    return sorted(
        p for p in root.iterdir() if p.is_dir() and (list_steps(p) or (p / LATEST).is_file())
    )


def latest_step_dir(run_root: str | Path) -> Path | None:
    """The step directory `latest` names (None when there is no `latest`)."""
    try:
        name = (Path(run_root) / LATEST).read_text().strip()
    except FileNotFoundError:
        return None
    return Path(run_root) / name


def resolve(path: str | Path) -> Path:
    """A step directory as given, or the one a run root's `latest` names."""
    path = Path(path)
    if (path / MANIFEST).exists() or STEP_RE.match(path.name):
        return path
    step_dir = latest_step_dir(path)
    if step_dir is None:
        raise CheckpointError(f"{path}: neither a step directory nor a run root with `{LATEST}`")
    if not step_dir.is_dir():
        raise CheckpointError(
            f"{path / LATEST} names {step_dir.name}, which does not exist; use "
            "find_latest_valid (--resume auto) to pick the newest valid step"
        )
    return step_dir


# ---------------------------------------------------------------- loading


def raw_fd(f: h5py.File) -> int | None:
    """The file descriptor under an HDF5 file opened with the default driver, else None."""
    return f.id.get_vfd_handle() if f.driver == "sec2" and hasattr(os, "preadv") else None


def read_dataset(ds: h5py.Dataset, fd: int | None = None) -> np.ndarray:
    """A dataset's values; contiguous ones straight from the file's descriptor `fd` (raw_fd).

    NOTE: HDF5's own read of a contiguous dataset was 3x slower here than reading the same
    bytes at its offset (H5Dget_offset exists for exactly this). Chunked, filtered or
    unallocated datasets, and files without a raw descriptor, go through HDF5.
    """
    offset = ds.id.get_offset()
    if offset is None or fd is None:
        return np.asarray(ds[()])
    return read_bytes(fd, offset, ds.dtype, ds.shape)


def _bytes_of(tensor: torch.Tensor | None) -> np.ndarray | None:
    """A writable uint8 view of a contiguous CPU tensor's memory (None passes through)."""
    return None if tensor is None else tensor.detach().reshape(-1).view(torch.uint8).numpy()


def read_bytes(
    fd: int, offset: int, dtype: np.dtype, shape: tuple[int, ...], view: np.ndarray | None = None
) -> np.ndarray:
    """An array of `shape` and `dtype` read from `fd` at byte `offset` (OSError when short).

    With `view` (uint8, exactly the bytes needed), the bytes land there: in place.
    """
    # NOTE: memory from torch's allocator, which puts big buffers on huge pages (see
    # hpcpipe/__init__.py): the page faults of fresh memory cost as much as the read itself.
    if view is None:
        view = torch.empty(math.prod(shape) * dtype.itemsize, dtype=torch.uint8).numpy()
    done = 0
    while done < view.nbytes:  # Linux reads at most 2 GiB per call
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise OSError(f"end of file after {done} of {view.nbytes} bytes")
        done += got
    return view.view(dtype).reshape(shape)


class _Files:
    """Shard files of one step directory, each opened once, with errors naming the file."""

    def __init__(self, step_dir: Path):
        self.step_dir = step_dir
        self.open: dict[str, h5py.File] = {}
        self.fds: dict[str, int | None] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for f in self.open.values():
            f.close()

    def get(self, file_name: str) -> h5py.File:
        """The open file (CheckpointError when missing, truncated or not HDF5)."""
        if file_name not in self.open:
            path = self.step_dir / file_name
            if not path.is_file():
                raise CheckpointError(f"{path}: shard file missing")
            try:
                self.open[file_name] = h5py.File(path, "r")
                self.fds[file_name] = raw_fd(self.open[file_name])
            except OSError as exc:
                raise CheckpointError(
                    f"{path}: cannot open ({exc}); the file is truncated or not HDF5"
                ) from None
        return self.open[file_name]

    def read(
        self, piece: dict, name: str, entry: dict, thorough: bool = False, into=None
    ) -> np.ndarray:
        """One saved piece, checked against the manifest (shape, dtype, checksum).

        Where the manifest records the piece's byte offset, the bytes are read from there
        without opening the dataset (HDF5's per-object reads cost about 20 % of a load);
        the checksum still proves they are the bytes saved under this name, dtype and shape.
        `thorough` also checks the dataset's own shape and dtype attributes (verify does).
        `into` (a C-contiguous CPU tensor of the piece's dtype and shape) receives the bytes
        on that path, and the array returned is a view of it; on the other path it is not.
        """
        where = f"{self.step_dir / piece['file']}, dataset {piece['dataset']!r}"
        f = self.get(piece["file"])
        if piece["dataset"] not in f:
            raise CheckpointError(f"{where}: dataset missing (tensor {name})")
        fd, offset = self.fds[piece["file"]], piece.get("byte_offset")
        if not thorough and fd is not None and offset is not None:
            dtype = np.dtype(_STORAGE[_BY_NAME[entry["dtype"]]]).newbyteorder("<")
            try:
                shape = tuple(piece["shape"])
                arr = read_bytes(fd, offset, dtype, shape, _bytes_of(into))
            except OSError as exc:
                raise CheckpointError(
                    f"{where}: unreadable ({exc}); the file is truncated"
                ) from None
            return self._checked(arr, piece, where)
        ds = f[piece["dataset"]]
        shape = ds.shape
        if list(shape) != list(piece["shape"]):
            raise CheckpointError(f"{where}: shape {shape}, manifest says {piece['shape']}")
        if ds.attrs.get("dtype") != entry["dtype"]:
            raise CheckpointError(
                f"{where}: dtype attribute {ds.attrs.get('dtype')!r}, manifest says "
                f"{entry['dtype']!r}"
            )
        try:
            arr = read_dataset(ds, fd)
        except OSError as exc:
            raise CheckpointError(f"{where}: unreadable ({exc}); the file is truncated") from None
        return self._checked(arr.astype(arr.dtype.newbyteorder("<"), copy=False), piece, where)

    @staticmethod
    def _checked(arr: np.ndarray, piece: dict, where: str) -> np.ndarray:
        """The array, once its checksum matches the manifest's."""
        found = checksum.recorded(piece)
        if found is None:
            raise CheckpointError(f"{where}: the manifest records no checksum for this piece")
        algorithm, expected = found
        if checksum.compute(algorithm, arr) != expected:
            raise CheckpointError(f"{where}: checksum mismatch (the data is corrupt)")
        return arr


def _overlap(piece: dict, offsets, shape) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
    """(slices into the saved piece, slices into the wanted piece), or None if disjoint."""
    src, dst = [], []
    for po, pn, wo, wn in zip(piece["offsets"], piece["shape"], offsets, shape, strict=True):
        lo, hi = max(po, wo), min(po + pn, wo + wn)
        if lo >= hi:
            return None
        src.append(slice(lo - po, hi - po))
        dst.append(slice(lo - wo, hi - wo))
    return tuple(src), tuple(dst)


def _as_tensor(arr: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A tensor over an array read from a file (ours to keep: no copy)."""
    if dtype == torch.bfloat16:
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr.astype(np.dtype(_STORAGE[dtype]), copy=False))


def _readable_into(target, dtype: torch.dtype, shape: tuple) -> bool:
    """Whether file bytes can land in `target` as they are."""
    return (
        target is not None
        and target.device.type == "cpu"
        and target.dtype == dtype
        and tuple(target.shape) == shape
        and target.is_contiguous()
    )


def assemble(files: _Files, name: str, entry: dict, offsets, shape, into=None) -> torch.Tensor:
    """The wanted slice of one global tensor, filled from every saved piece that overlaps it.

    With `into` (a tensor of the wanted shape), the values are written there and it is
    returned: read straight from the file where possible, else copied (and cast).
    """
    dtype = _BY_NAME[entry["dtype"]]
    shape, offsets = tuple(shape), tuple(offsets)
    for piece in entry["pieces"]:  # fast path: a piece that is exactly the wanted slice
        if tuple(piece["offsets"]) == offsets and tuple(piece["shape"]) == shape:
            direct = into if _readable_into(into, dtype, shape) else None
            arr = files.read(piece, name, entry, into=direct)
            if direct is not None and np.may_share_memory(arr, _bytes_of(direct)):
                return direct
            return _into(into, _as_tensor(arr, dtype).reshape(shape))
    out = _pieces(files, name, entry, offsets, shape, dtype)
    return _into(into, out)


def _into(target, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, or copied into `target` when one is given."""
    if target is None:
        return tensor
    with torch.no_grad():
        target.copy_(tensor)
    return target


def _pieces(files: _Files, name: str, entry: dict, offsets, shape, dtype) -> torch.Tensor:
    """The wanted slice assembled from the overlapping parts of several saved pieces."""
    out = torch.empty(shape, dtype=dtype)
    filled, seen = 0, set()
    for piece in entry["pieces"]:
        hit = _overlap(piece, offsets, shape)
        key = (tuple(piece["offsets"]), tuple(piece["shape"]))
        # NOTE: identical copies (a replicated tensor saved by several positions) are read once;
        # distinct pieces never overlap (save_checkpoint refuses that), so volumes add up.
        if hit is None or key in seen:
            continue
        seen.add(key)
        saved = _as_tensor(files.read(piece, name, entry), dtype).reshape(piece["shape"])
        out[hit[1]] = saved[hit[0]]
        filled += math.prod(d.stop - d.start for d in hit[1])
    if filled != math.prod(shape):
        raise CheckpointError(
            f"{files.step_dir}: tensor {name}: the saved pieces do not cover offsets "
            f"{list(offsets)} shape {list(shape)}"
        )
    return out


def _check_wanted(step_dir: Path, manifest: dict, name: str, gshape, offsets, shape) -> dict:
    """The tensor's manifest entry, after checking the wanted slice against it."""
    entry = manifest["tensors"].get(name)
    if entry is None:
        raise CheckpointError(f"{step_dir}: no tensor {name!r} in the checkpoint")
    if list(entry["global_shape"]) != list(gshape):
        raise CheckpointError(
            f"{step_dir}: tensor {name}: saved global shape {tuple(entry['global_shape'])}, "
            f"wanted {tuple(gshape)}"
        )
    if entry.get("dtype") not in _BY_NAME:
        raise CheckpointError(f"{step_dir}: tensor {name}: unknown dtype {entry.get('dtype')!r}")
    probe = Shard(name, torch.empty(tuple(shape), device="meta"), tuple(gshape), tuple(offsets))
    check_shard(probe)
    return entry


def load_checkpoint(
    path: str | Path,
    wanted: list[tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]]],
    device="cpu",
    into: dict[str, torch.Tensor] | None = None,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """(manifest, {name: tensor}) for the (name, global_shape, offsets, local_shape) wanted.

    Tensors come back in their saved dtype; the caller casts if it trains in another one.
    `into` maps names to existing tensors of the local shape (a resume's parameters and
    optimizer state) that receive the values in place, as torch.distributed.checkpoint does:
    contiguous CPU ones of the saved dtype straight from the file, others by a copy. A load
    that fails may have written some of them.
    """
    step_dir = resolve(path)
    manifest = read_manifest(step_dir)
    out, into = {}, into or {}
    with _Files(step_dir) as files:
        for name, gshape, offsets, shape in wanted:
            entry = _check_wanted(step_dir, manifest, name, gshape, offsets, shape)
            out[name] = assemble(files, name, entry, offsets, shape, into.get(name))
    return manifest, {name: t.to(device) for name, t in out.items()}


def full_tensors(path: str | Path, keep=lambda name: True) -> tuple[dict, dict[str, torch.Tensor]]:
    """(manifest, every whole global tensor whose name `keep` accepts)."""
    manifest = read_manifest(resolve(path))
    wanted = [
        (name, tuple(e["global_shape"]), (0,) * len(e["global_shape"]), tuple(e["global_shape"]))
        for name, e in manifest["tensors"].items()
        if keep(name)
    ]
    return load_checkpoint(path, wanted)


# ---------------------------------------------------------------- verification


def _verify_piece(files: _Files, name: str, entry: dict, piece: dict) -> list[str]:
    """Problems of one saved piece: file, dataset, attributes, checksum."""
    try:
        files.read(piece, name, entry, thorough=True)
        ds = files.get(piece["file"])[piece["dataset"]]
    except CheckpointError as exc:
        return [str(exc)]
    where = f"{files.step_dir / piece['file']}, dataset {piece['dataset']!r}"
    problems = []
    if list(ds.attrs.get("global_shape", [])) != list(entry["global_shape"]):
        problems.append(
            f"{where}: global_shape attribute {list(ds.attrs.get('global_shape', []))}, "
            f"manifest says {entry['global_shape']}"
        )
    if list(ds.attrs.get("offsets", [])) != list(piece["offsets"]):
        problems.append(f"{where}: offsets attribute differs from the manifest")
    return problems


def verify(path: str | Path) -> list[str]:
    """Problems found in a checkpoint (empty = valid); reads and checksums every piece."""
    try:
        step_dir = resolve(path)
        manifest = read_manifest(step_dir)
    except CheckpointError as exc:
        return [str(exc)]
    problems = []
    missing = [f for f in manifest.get("files", []) if not (step_dir / f).is_file()]
    problems += [f"{step_dir / f}: shard file missing" for f in missing]
    with _Files(step_dir) as files:
        for name, entry in manifest["tensors"].items():
            problem = coverage_problem(name, entry)
            if problem:
                problems.append(f"{step_dir}: {problem}")
            for piece in entry["pieces"]:
                if piece["file"] in missing:
                    continue
                found = _verify_piece(files, name, entry, piece)
                problems += [p for p in found if p not in problems]
    return problems


def find_latest_valid(root: str | Path) -> Path | None:
    """Newest step directory that verifies fully; warns about each newer invalid one skipped."""
    for step, step_dir in reversed(list_steps(root)):
        problems = verify(step_dir)
        if not problems:
            return step_dir
        warnings.warn(
            f"skipping checkpoint {step_dir} (step {step}): " + "; ".join(problems[:5]),
            stacklevel=2,
        )
    return None


# ---------------------------------------------------------------- saving (collective)


def _barrier(comm, timeout: float, what: str) -> None:
    """Barrier that sleeps while waiting (MPI's spins a core) and gives up after `timeout`."""
    rank = comm.Get_rank()
    wait_politely(
        comm.Ibarrier(),
        time.monotonic() + timeout,
        lambda: (
            f"rank {rank}: checkpoint: not every rank reached '{what}' within {timeout:.0f} s; "
            "a rank is stuck or dead"
        ),
    )


def _gather(comm, obj, timeout: float, what: str):
    """comm.gather to rank 0, after a polite barrier so nobody spins in the blocking call."""
    _barrier(comm, timeout, what)
    return comm.gather(obj, root=0)


def _share(comm, obj, timeout: float, what: str):
    """Rank 0's obj on every rank, after a polite barrier."""
    _barrier(comm, timeout, what)
    return comm.bcast(obj, root=0)


def _attempt(fn, *args) -> tuple[object, str | None]:
    """(fn(*args), None), or (None, the error) so every rank can take part in the verdict."""
    try:
        return fn(*args), None
    except Exception as exc:  # reported to all ranks, then raised there
        return None, f"{type(exc).__name__}: {exc}"


def _raise_if_failed(error: str | None, step: int) -> None:
    """Raise the same CheckpointError on every rank when any rank failed."""
    if error:
        raise CheckpointError(f"checkpoint step {step} not saved: {error}")


def _verdict(gathered_errors: list | None) -> str | None:
    """Rank 0: the failures of all ranks as one message (None when all succeeded)."""
    if gathered_errors is None:
        return None
    failed = [f"rank {r}: {e}" for r, e in enumerate(gathered_errors) if e]
    return "; ".join(failed) or None


def _remove_leftovers(root: Path) -> None:
    """Remove the tmp/trash directories of saves or prunes that did not finish."""
    for p in root.iterdir():
        if p.is_dir() and (p.name.startswith(".tmp_step_") or p.name.startswith(".trash_step_")):
            shutil.rmtree(p, ignore_errors=True)  # a prune thread may be deleting it too


def _prepare(root: Path, step: int, positions: list[tuple[bool, str]]) -> None:
    """Rank 0: refuse clashing positions, clear leftovers, create the tmp directory."""
    writers = [p for w, p in positions if w]
    dup = sorted({p for p in writers if writers.count(p) > 1})
    if dup:
        raise CheckpointError(f"several writer ranks claim position(s) {dup}")
    bad = [p for p in writers if not p or "/" in p or p.startswith(".")]
    if bad:
        raise CheckpointError(f"bad position name(s) {bad}: need a plain file stem")
    root.mkdir(parents=True, exist_ok=True)
    wait_for_pruning()  # else it and _remove_leftovers would delete the same folder at once
    _remove_leftovers(root)
    (root / f".tmp_step_{step}").mkdir()


def _commit(root: Path, step: int, manifest: dict, records: list[dict], keep: int) -> None:
    """Rank 0: manifest, rename into place, `latest`, prune; each durable before the next."""
    tmp, final = root / f".tmp_step_{step}", root / f"step_{step}"
    write_json(tmp / MANIFEST, build_manifest(manifest, step, records))
    fsync_path(tmp)
    if final.exists():
        # NOTE: re-saving a step (after a resume from an older one) replaces it whole.
        final.rename(root / f".trash_step_{step}")
    os.replace(tmp, final)
    fsync_path(root)
    doomed = [root / f".trash_step_{step}"] if (root / f".trash_step_{step}").exists() else []
    latest_tmp = root / f"{LATEST}.tmp"
    latest_tmp.write_text(f"{final.name}\n")
    fsync_path(latest_tmp)
    os.replace(latest_tmp, root / LATEST)
    fsync_path(root)
    doomed += [p.with_name(f".trash_{p.name}") for p in prune(root, keep, protect=final, now=False)]
    # NOTE: deleting gigabytes takes a while and nothing reads .trash_* folders: let training
    # go on meanwhile (a non-daemon thread, so the process still finishes the job at exit).
    _start_delete(doomed)


# Deletions still running in the background, oldest first (only rank 0 of a save starts them).
_DELETERS: list[threading.Thread] = []


def _start_delete(paths: list[Path]) -> None:
    wait_for_pruning()  # one at a time: a new trash folder may reuse the previous one's name
    thread = threading.Thread(target=_delete, args=(paths,), name="hpcpipe-prune")
    _DELETERS.append(thread)
    thread.start()


def wait_for_pruning() -> None:
    """Block until the old steps that earlier saves retired are deleted from disk."""
    while _DELETERS:
        _DELETERS.pop(0).join()


def _delete(paths: list[Path]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def prune(root: str | Path, keep: int, protect: Path | None = None, now: bool = True) -> list[Path]:
    """Retire all but the newest `keep` steps (never `protect`); keep < 1 keeps all.

    Each is first renamed to .trash_step_<N> (so a crash mid-delete leaves no half-deleted
    step_<N>), then deleted now or, with now=False, by the caller.
    """
    if keep < 1:
        return []
    steps = [p for _, p in list_steps(root)]
    doomed = [p for p in steps[:-keep] if p != protect]
    for p in doomed:
        trash = p.with_name(f".trash_{p.name}")
        p.rename(trash)
        if now:
            shutil.rmtree(trash)
    return doomed


def save_checkpoint(
    root: str | Path,
    step: int,
    comm,
    shards: list[Shard],
    writer: bool,
    position: str,
    manifest: dict,
    keep: int = 3,
    timeout: float = 300.0,
    on_dataset=None,
) -> Path:
    """Collective: write root/step_<step>/ atomically; every rank calls it; returns the step dir.

    Raises CheckpointError on every rank when any rank fails (the previous step stays valid).
    """
    root = Path(root)
    leader = comm.Get_rank() == 0
    positions = _gather(comm, (writer, position), timeout, "start of save")
    _, error = _attempt(_prepare, root, step, positions) if leader else (None, None)
    _raise_if_failed(_share(comm, error, timeout, "tmp directory ready"), step)

    tmp = root / f".tmp_step_{step}"
    records, error = (
        _attempt(write_shard_file, tmp, position, shards, on_dataset) if writer else ([], None)
    )
    gathered = _gather(comm, (records or [], error), timeout, "shards written")
    error = None
    if leader:
        error = _verdict([e for _, e in gathered])
        if error is None:
            every = [r for recs, _ in gathered for r in recs]
            _, error = _attempt(_commit, root, step, manifest, every, keep)
    _raise_if_failed(_share(comm, error, timeout, "checkpoint committed"), step)
    return root / f"step_{step}"
