"""Predicted against measured memory per rank, through the real trainer, in one launch.

Usage: mpiexec -n K python -m mpi4py tests/mpi/memory_cases.py OUT.json
Every rank runs two steps of each case and reports its own predicted and measured bytes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from mpi4py import MPI

from hpcpipe import data
from hpcpipe.config import build_config
from hpcpipe.parallel.grid import Grid, Topology
from hpcpipe.train.trainer import PipelineTrainer, make_blueprint

MODEL = {"n_layers": 8, "d_model": 32, "n_heads": 2, "seq_len": 16}
SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("zb-h1", 1), ("2bw", 1)]


def cases(world: int) -> list[dict]:
    out = [{"schedule": n, "virtual": V, "layout": (1, world, 1), "zero": 0, "recompute": "false",
            "dtype": "float32"} for n, V in SCHEDULES]  # fmt: skip
    out.append({**out[1], "recompute": "selective"})
    out.append({**out[1], "recompute": "full"})
    out.append({**out[1], "dtype": "bfloat16"})
    if world == 4:
        for zero in (0, 1):
            out.append({**out[1], "layout": (2, 2, 1), "zero": zero, "dtype": "bfloat16"})
    return out


def run(comm, case: dict, tokens) -> dict:
    dp, pp, tp = case["layout"]
    config = build_config(
        {
            "model": MODEL,
            "train": {"global_batch": 8 * dp, "steps": 2, "dtype": case["dtype"], "seed": 3},
            "parallel": {"dp": dp, "pp": pp, "tp": tp, "timeout": 60, "zero": case["zero"]},
            "schedule": {"name": case["schedule"], "microbatches": 8, "virtual": case["virtual"],
                         "recompute": case["recompute"]},
        }
    )  # fmt: skip
    grid = Grid(comm, Topology(dp, pp, tp))
    trainer = PipelineTrainer(config, grid, make_blueprint(config, comm.Get_size()), tokens=tokens)
    predicted = {k: v for k, v in trainer.predicted_memory().items() if k != "per_microbatch"}
    for _ in range(2):
        trainer.train_step()
    measured = trainer.memory.measure(trainer.memory_tensors())
    grid.free()
    return {"predicted": predicted, "measured": measured, "pp_rank": grid.pp_rank}


def main() -> None:
    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    tokens = data.load_tokens(None, max_bytes=64 * 1024)
    results = []
    for case in cases(comm.Get_size()):
        ranks = comm.gather(run(comm, case, tokens), root=0)
        if comm.Get_rank() == 0:
            results.append({**case, "world": comm.Get_size(), "ranks": ranks})
    if comm.Get_rank() == 0:
        Path(sys.argv[1]).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
