"""Checkpoint cases on 4 ranks.

`reshard ROOT OUT`: save pieces from every rank, load them back in other splits; rank 0 writes
{check: true | message} JSON to OUT. `kill ROOT`: commit step 1, then rank 2 SIGKILLs itself
while writing its shard of step 2 (the job dies; pytest checks what is left on disk).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
from mpi4py import MPI

from hpcpipe.checkpoint import format as fmt
from hpcpipe.checkpoint import store as ck
from hpcpipe.checkpoint.format import CheckpointError, Shard
from hpcpipe.checkpoint.manifest import read_manifest

ROWS, COLS = 8, 6


def matrix(dtype=torch.float64) -> torch.Tensor:
    """The global matrix every rank knows (so each can check what it loads)."""
    return (torch.arange(ROWS * COLS, dtype=torch.float64).reshape(ROWS, COLS) / 7).to(dtype)


def embed() -> torch.Tensor:
    return torch.linspace(-3, 3, 5).to(torch.bfloat16)


def rows_of(full: torch.Tensor, rank: int, parts: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """This rank's block of rows and its offsets."""
    n = full.shape[0] // parts
    return full[rank * n : (rank + 1) * n].contiguous(), (rank * n, 0)


def cols_of(full: torch.Tensor, rank: int, parts: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """This rank's block of columns and its offsets."""
    n = full.shape[1] // parts
    return full[:, rank * n : (rank + 1) * n].contiguous(), (0, rank * n)


def shards_4way(rank: int) -> list[Shard]:
    """w split by rows 4 ways, its optimizer state by columns on ranks 0-1, embed on rank 0."""
    w, w_at = rows_of(matrix(), rank, 4)
    shards = [Shard("w", w, (ROWS, COLS), w_at)]
    if rank < 2:
        m, m_at = cols_of(optim_state(), rank, 2)
        shards.append(Shard("optim.exp_avg/w", m, (ROWS, COLS), m_at))
    if rank == 0:
        shards.append(Shard("embed", embed(), (5,), (0,)))
    return shards


def optim_state() -> torch.Tensor:
    return matrix(torch.float32) * -1


def wanted_other_split(rank: int) -> dict[str, tuple[tuple, torch.Tensor]]:
    """{name: (offsets, expected piece)}: each crosses several saved pieces; rank 3 owns nothing."""
    if rank < 2:
        w, w_at = rows_of(matrix(), rank, 2)
        m, m_at = rows_of(optim_state(), rank, 2)
        return {"w": (w_at, w), "optim.exp_avg/w": (m_at, m), "embed": ((0,), embed())}
    if rank == 2:
        w, w_at = cols_of(matrix(), 1, 2)
        return {"w": (w_at, w), "optim.exp_avg/w": ((0, 0), optim_state())}
    return {}


def load_matches(path, rank: int) -> bool:
    """Load this rank's slices in the other split and compare exactly (dtype included)."""
    wanted = wanted_other_split(rank)
    specs = [
        (n, (5,) if n == "embed" else (ROWS, COLS), at, tuple(t.shape))
        for n, (at, t) in wanted.items()
    ]
    _, got = ck.load_checkpoint(path, specs)
    return sorted(got) == sorted(wanted) and all(
        got[n].dtype == t.dtype and torch.equal(got[n], t) for n, (_, t) in wanted.items()
    )


def all_true(comm, ok: bool) -> bool:
    return all(comm.allgather(bool(ok)))


def save_with_replicas(comm, root: Path) -> bool:
    """dp=2 x pp=2: only dp_rank 0 writes; the replicas pass the same positions."""
    rank = comm.Get_rank()
    pp = rank % 2
    w, w_at = rows_of(matrix(), pp, 2)
    step_dir = ck.save_checkpoint(
        root, 2, comm, [Shard("w", w, (ROWS, COLS), w_at)], rank < 2, f"pp{pp}_tp0", {}, keep=5
    )
    _, got = ck.load_checkpoint(step_dir, [("w", (ROWS, COLS), (0, 0), (ROWS, COLS))])
    return torch.equal(got["w"], matrix()) and sorted(p.name for p in step_dir.iterdir()) == [
        "manifest.json",
        "pp0_tp0.h5",
        "pp1_tp0.h5",
    ]


def failure_reaches_every_rank(comm, root: Path) -> bool:
    """A rank that cannot write makes every rank raise, naming it; `latest` stays put."""
    rank = comm.Get_rank()
    shards = shards_4way(rank)
    if rank == 3:
        shards = [Shard("w", torch.zeros(3, COLS, dtype=torch.float64), (ROWS, COLS), (6, 0))]
    try:
        ck.save_checkpoint(root, 3, comm, shards, True, f"pp{rank}_tp0", {}, timeout=60)
    except CheckpointError as exc:
        ok = "rank 3" in str(exc) and "does not fit" in str(exc)
    else:
        ok = False
    return ok and ck.resolve(root).name == "step_2"


def reshard(root: Path, out: Path) -> None:
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    checks = {}
    manifest = {"layout": {"pp": 4, "tp": 1, "dp": 1}, "config": {"note": "mpi test"}}
    step_dir = ck.save_checkpoint(
        root, 1, comm, shards_4way(rank), True, f"pp{rank}_tp0", manifest, timeout=60
    )
    checks["committed_on_every_rank"] = all_true(comm, (step_dir / "manifest.json").is_file())
    checks["four_files"] = sorted(read_manifest(step_dir)["files"]) == [
        f"pp{r}_tp0.h5" for r in range(4)
    ]
    checks["load_other_split"] = all_true(comm, load_matches(root, rank))
    checks["verify"] = ck.verify(step_dir) == [] if rank == 0 else True
    checks["writer_false_replicas"] = all_true(comm, save_with_replicas(comm, root))
    checks["failure_reaches_every_rank"] = all_true(comm, failure_reaches_every_rank(comm, root))
    if rank == 0:
        out.write_text(json.dumps(checks))


def kill(root: Path) -> None:
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    position = f"pp{rank}_tp0"
    ck.save_checkpoint(root, 1, comm, shards_4way(rank), True, position, {}, timeout=60)
    write = fmt._write_dataset

    def dying_write(f, shard, file_name):
        record = write(f, shard, file_name)
        if rank == 2:
            f.flush()  # a half-written file really is on disk
            os.kill(os.getpid(), signal.SIGKILL)
        return record

    fmt._write_dataset = dying_write
    shards = shards_4way(rank) + [Shard("extra", torch.ones(3), (3,), (0,))] * (rank == 2)
    ck.save_checkpoint(root, 2, comm, shards, True, position, {}, timeout=60)
    print(f"rank {rank}: step 2 was committed although rank 2 died", file=sys.stderr)


if __name__ == "__main__":
    if sys.argv[1] == "reshard":
        reshard(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        kill(Path(sys.argv[2]))
