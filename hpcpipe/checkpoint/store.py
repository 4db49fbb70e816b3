"""The checkpoint store: steps on disk, commit, prune, load. Any layout loads any checkpoint.

On disk (one run root, e.g. checkpoints/<run>/):

    latest                 "step_<N>\\n": the last committed step (written last, atomically)
    step_<N>/manifest.json trainer's manifest + format_version, tensors (global shape, dtype,
                           pieces: file, dataset, offsets, shape, xxh3_64), files
    step_<N>/<position>.h5 one file per (pp, tp) position, written by its dp_rank 0 replica
    step_<N>/<attachment>  small files committed with the step (the run's tokenizer.json), each
                           listed in the manifest's `attachments` with its sha256
    .tmp_step_<N>/         a save in progress (or one that crashed): ignored, removed by the next
    .trash_step_<N>/       an old step being pruned (renamed first, so pruning is atomic too)

Shard files are described in format.py, the manifest in manifest.py; this module lays out
the steps on disk, commits, prunes and loads.

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

import hashlib
import os
import shutil
import threading
import time
import warnings
from pathlib import Path

import torch

from hpcpipe.checkpoint.format import (
    LATEST,
    MANIFEST,
    STEP_RE,
    CheckpointError,
    Shard,
    ShardFiles,
    assemble,
    fsync_path,
    write_shard_file,
)
from hpcpipe.checkpoint.manifest import (
    build_manifest,
    check_wanted,
    coverage_problem,
    read_manifest,
    write_json,
)
from hpcpipe.parallel.p2p import wait_politely


def list_steps(run_root: str | Path) -> list[tuple[int, Path]]:
    """Committed step directories (step_<N>) of one run, oldest first; tmp dirs are ignored."""
    root = Path(run_root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_RE.match(p.name))]
    return sorted(s for s in found if s[1].is_dir())


def committed_steps(run_root: str | Path) -> list[tuple[int, Path]]:
    """(step, step directory) of every committed step of one run, NEWEST first; reads no shard.

    A step_<N> folder exists only once committed (save_checkpoint renames it into place after
    its manifest is durable), so this is what `--resume auto` tries, in this order: each rank
    then checks what it loads (every piece's checksum) and a damaged step fails there.
    """
    return list(reversed(list_steps(run_root)))


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
    with ShardFiles(step_dir) as files:
        for name, gshape, offsets, shape in wanted:
            entry = check_wanted(step_dir, manifest, name, gshape, offsets, shape)
            # NOTE: the manifest has no checksum of its own: pieces it places wrongly (an
            # overlap and a gap of the same size) would otherwise fill the slice silently.
            problem = coverage_problem(name, entry)
            if problem:
                raise CheckpointError(f"{step_dir}: {problem}")
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


def _verify_piece(files: ShardFiles, name: str, entry: dict, piece: dict) -> list[str]:
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
    for name, digest in (manifest.get("attachments") or {}).items():
        problem = _attachment_problem(step_dir / name, digest)
        problems += [problem] if problem else []
    with ShardFiles(step_dir) as files:
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


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _attachment_problem(path: Path, digest: str) -> str | None:
    """Why an attachment the manifest lists is not there as written (None when it is)."""
    try:
        found = _sha256(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{path}: attachment missing (the manifest lists it)"
    except (OSError, UnicodeDecodeError) as exc:
        return f"{path}: attachment unreadable ({exc})"
    return None if found == digest else f"{path}: sha256 {found}, the manifest says {digest}"


def _attach(tmp: Path, files: dict[str, str]) -> dict[str, str]:
    """Rank 0: write the step's attachments durably; {name: sha256} for the manifest."""
    bad = [n for n in files if not n or "/" in n or n.startswith(".") or n == MANIFEST]
    if bad:
        raise CheckpointError(f"bad attachment name(s) {bad}: need a plain file name")
    for name, text in files.items():
        with open(tmp / name, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    return {name: _sha256(text) for name, text in files.items()}


def _commit(
    root: Path,
    step: int,
    manifest: dict,
    records: list[dict],
    keep: int,
    files: dict[str, str] | None = None,
) -> None:
    """Rank 0: attachments, manifest, rename into place, `latest`, prune; each durable first."""
    tmp, final = root / f".tmp_step_{step}", root / f"step_{step}"
    if files:  # NOTE: in the tmp folder, so they are committed with the step, or not at all
        manifest = {**manifest, "attachments": _attach(tmp, files)}
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
    files: dict[str, str] | None = None,
) -> Path:
    """Collective: write root/step_<step>/ atomically; every rank calls it; returns the step dir.

    files: {name: text} written beside the manifest and committed with the step (rank 0's only).
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
            _, error = _attempt(_commit, root, step, manifest, every, keep, files)
    _raise_if_failed(_share(comm, error, timeout, "checkpoint committed"), step)
    return root / f"step_{step}"
