"""Run many pipeline cases in ONE mpiexec launch and compare each with single-process training.

Usage: mpiexec -n K python tests/mpi/pipeline_cases.py OUT.json
Every rank runs the serial oracle itself (the model is tiny) and compares its own stages'
gradients and parameters by global name; rank 0 writes one JSON record per case.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from mpi4py import MPI
from pipeline_case_list import cases

from hpcpipe import data
from hpcpipe.config import build_config
from hpcpipe.grid import Grid, Topology
from hpcpipe.schedule import validate
from hpcpipe.serial import SerialTrainer
from hpcpipe.train import PipelineTrainer, make_plan

STEPS = 3
TINY = {"n_layers": 2, "d_model": 16, "n_heads": 2, "seq_len": 8, "vocab_size": 256}


def case_config(world: int, case: dict):
    M, V = case["microbatches"], case["virtual"]
    return build_config(
        {
            "model": {**TINY, "n_layers": max(TINY["n_layers"], world * V)},
            "train": {"global_batch": 2 * M, "steps": STEPS, "dtype": "float64", "lr": 1e-2,
                      "warmup_steps": 1, "grad_clip": 0.5, "seed": 7},
            "parallel": {"pp": world, "timeout": 20},
            "schedule": {"name": case["schedule"], "microbatches": M, "virtual": V,
                         "recompute": case["recompute"]},
        }
    )  # fmt: skip


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative difference."""
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def run_case(comm, world: int, case: dict, tokens) -> dict:
    """Train STEPS steps both ways; return this rank's worst differences."""
    config = case_config(world, case)
    grid = Grid(comm, Topology(1, world, 1))
    plan = make_plan(config, world)
    trainer = PipelineTrainer(config, grid, plan, tokens=tokens)
    oracle = SerialTrainer(config, tokens=tokens)
    bound = validate(plan.schedule, world, case["microbatches"], case["virtual"])
    worst = {"loss": 0.0, "grad": 0.0, "param": 0.0, "peak": [], "bound": 0}
    worst["bound"] = bound.peak_activations[grid.pp_rank]
    for _ in range(STEPS):
        result = trainer.forward_backward()
        ref_loss = oracle.forward_backward()
        ref_grads = oracle.grads()
        for name, p in local_params(trainer):
            worst["grad"] = max(worst["grad"], rel(p.grad, ref_grads[name]))
        record = trainer.finish_step(result)
        ref_norm = oracle.finish_step()
        worst["clipped"] = worst.get("clipped", False) or ref_norm > config.train.grad_clip
        worst["loss"] = max(worst["loss"], abs(record["loss"] - ref_loss) / abs(ref_loss))
        worst["norm"] = max(worst.get("norm", 0.0), abs(record["grad_norm"] - ref_norm) / ref_norm)
        worst["peak"].append(result.peak_activations)
    ref_params = oracle.params()
    for name, p in local_params(trainer):
        worst["param"] = max(worst["param"], rel(p.detach(), ref_params[name]))
    grid.free()
    return worst


def local_params(trainer: PipelineTrainer):
    """(global name, parameter) of every stage this rank holds."""
    stages = trainer.stages.values()
    return [kv for stage in stages for kv in stage.named_parameters(remove_duplicate=False)]


def main() -> None:
    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    world = comm.Get_size()
    tokens = data.load_tokens(None, max_bytes=64 * 1024)
    results = []
    for case in cases(world):
        mine = run_case(comm, world, case, tokens)
        gathered = comm.gather(mine, root=0)
        if comm.Get_rank() == 0:
            results.append(
                {
                    **case,
                    "world": world,
                    "loss_rel": max(g["loss"] for g in gathered),
                    "grad_rel": max(g["grad"] for g in gathered),
                    "param_rel": max(g["param"] for g in gathered),
                    "norm_rel": max(g["norm"] for g in gathered),
                    "clipped": gathered[0]["clipped"],
                    "peak_per_rank": [max(g["peak"]) for g in gathered],
                    "schedule_peak_per_rank": [g["bound"] for g in gathered],
                }
            )
    if comm.Get_rank() == 0:
        with open(sys.argv[1], "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
