"""The checkpoint file format: HDF5 shard files of tensor pieces keyed by GLOBAL names.

Inside a shard file every tensor piece is one dataset at the file's root, named by its global
name with "%" -> "%25" and "/" -> "%2F" (so "optim.exp_avg/layers.3.w" stays one dataset, not a
group); `h5ls -r` / `h5dump` read them as they are. Attributes: name (the global name),
global_shape, offsets, dtype (torch dtype, e.g. "bfloat16") and xxh3_64 (of the dataset's
little-endian bytes; format version 1 recorded sha256 instead, still read: see checksum.py).
bfloat16 has no HDF5/numpy type: it is stored as its uint16 bit patterns. Pieces are read at the
byte offset the manifest records (no dataset lookup) and assembled into any requested slice.
"""

from __future__ import annotations

import ctypes
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from hpcpipe.checkpoint import checksum

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


class CheckpointMismatch(CheckpointError):
    """A sound checkpoint of another model: a wanted tensor is absent or has another shape."""


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


DTYPES_BY_NAME = {dtype_name(d): d for d in _STORAGE}


def dataset_name(name: str) -> str:
    """HDF5 dataset name for a global tensor name ('/' escaped so no group is created)."""
    return name.replace("%", "%25").replace("/", "%2F")


# ---------------------------------------------------------------- tensors <-> arrays


def to_array(tensor: torch.Tensor) -> np.ndarray:
    """Host, contiguous, little-endian numpy copy of a tensor (bf16 as uint16 bits)."""
    if tensor.dtype not in _STORAGE:
        supported = ", ".join(sorted(DTYPES_BY_NAME))
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


def _write_dataset(f: h5py.File, shard: Shard, file_name: str, dataset: str) -> dict:
    """Write one piece with its attributes; return its manifest record.

    NOTE: the checksum is computed inline: at XXH3's ~22 GB/s a helper thread saved nothing,
    and handing pieces to one cost more in GIL hand-overs than the hash itself.
    """
    arr = to_array(shard.tensor)
    digest = digest_of(arr)
    ds = f.create_dataset(dataset, data=arr)
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
        "dataset": dataset,
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
    # NOTE: one position may hold several pieces of a tensor (a ZeRO fragment is cut into
    # boxes); each further piece's dataset name carries its offsets.
    keys = [(s.name, tuple(s.offsets)) for s in shards]
    if len(set(keys)) != len(keys):
        dup = sorted({n for n, _ in keys if keys.count((n, _)) > 1})
        raise CheckpointError(f"position {position}: tensors given twice: {dup}")
    datasets, seen = [], set()
    for s in shards:
        name = dataset_name(s.name)
        if s.name in seen:
            name += "@" + "_".join(str(o) for o in s.offsets)
        seen.add(s.name)
        datasets.append(name)
    for shard in shards:
        check_shard(shard)
    file_name = f"{position}.h5"
    path = Path(directory) / file_name
    with h5py.File(path, "w") as f:
        records, fd = [], f.id.get_vfd_handle()
        for shard, dataset in zip(shards, datasets, strict=True):
            records.append(_write_dataset(f, shard, file_name, dataset))
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


class ShardFiles:
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
            dtype = np.dtype(_STORAGE[DTYPES_BY_NAME[entry["dtype"]]]).newbyteorder("<")
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


def assemble(files: ShardFiles, name: str, entry: dict, offsets, shape, into=None) -> torch.Tensor:
    """The wanted slice of one global tensor, filled from every saved piece that overlaps it.

    With `into` (a tensor of the wanted shape), the values are written there and it is
    returned: read straight from the file where possible, else copied (and cast).
    """
    dtype = DTYPES_BY_NAME[entry["dtype"]]
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


def _pieces(files: ShardFiles, name: str, entry: dict, offsets, shape, dtype) -> torch.Tensor:
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
