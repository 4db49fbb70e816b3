"""Train the example family (examples/own_model) in ONE mpiexec launch; compare with serial.

Usage: mpiexec -n 2 python -m mpi4py tests/mpi/own_model_cases.py OUT.json  (from the repo root)
sys.path holds this folder, not the repository root, so `model.arch =
"examples.own_model:spec"` imports only through the registry's working-directory fallback.
Every rank runs the serial oracle itself and compares its own stages' gradients and
parameters by global name, in float64; rank 0 writes one JSON record per case.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from mpi4py import MPI

from hpcpipe import data
from hpcpipe.config import build_config
from hpcpipe.parallel.grid import Grid, Topology
from hpcpipe.train.serial import SerialTrainer
from hpcpipe.train.trainer import PipelineTrainer, make_blueprint

ARCH = "examples.own_model:spec"
STEPS = 3
# (schedule, V, M, tie_embeddings)
CASES = [("1f1b", 1, 3, True), ("1f1b", 1, 2, False), ("gpipe", 1, 3, True),
         ("zb-h1", 1, 4, True), ("interleaved", 2, 4, True)]  # fmt: skip


def case_config(pp: int, name: str, V: int, M: int, tie: bool):
    return build_config(
        {
            "model": {"arch": ARCH, "n_layers": pp * V, "d_model": 16, "n_heads": 2,
                      "seq_len": 8, "tie_embeddings": tie},
            "train": {"global_batch": 2 * M, "steps": STEPS, "dtype": "float64", "lr": 1e-2,
                      "warmup_steps": 1, "grad_clip": 0.5, "seed": 11},
            "parallel": {"pp": pp, "timeout": 60},
            "schedule": {"name": name, "microbatches": M, "virtual": V},
        }
    )  # fmt: skip


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def run_case(comm, case, tokens) -> dict:
    config = case_config(comm.Get_size(), *case)
    grid = Grid(comm, Topology(1, comm.Get_size(), 1))
    blueprint = make_blueprint(config, comm.Get_size())
    trainer = PipelineTrainer(config, grid, blueprint, tokens=tokens)
    oracle = SerialTrainer(config, tokens=tokens)
    stages = trainer.stages.values()
    held = [kv for stage in stages for kv in stage.named_parameters(remove_duplicate=False)]
    worst = {"loss": 0.0, "grad": 0.0, "param": 0.0, "norm": 0.0, "clipped": False}
    for _ in range(STEPS):
        result = trainer.forward_backward()
        ref_loss, ref_grads = oracle.forward_backward(), oracle.grads()
        worst["grad"] = max([worst["grad"]] + [rel(p.grad, ref_grads[n]) for n, p in held])
        record, ref_norm = trainer.finish_step(result), oracle.finish_step()
        worst["loss"] = max(worst["loss"], abs(record["loss"] - ref_loss) / abs(ref_loss))
        worst["norm"] = max(worst["norm"], abs(record["grad_norm"] - ref_norm) / ref_norm)
        worst["clipped"] |= ref_norm > config.train.grad_clip
    ref_params = oracle.params()
    worst["param"] = max(rel(p, ref_params[n]) for n, p in held)
    worst["names"] = sorted(n for n, _ in held)
    worst["kinds"] = sorted({type(layer).__name__ for st in stages for layer in st.layers.values()})
    worst["bounds"] = [list(b) for b in blueprint.partition.bounds]
    grid.free()
    return worst


def main() -> None:
    torch.set_num_threads(1)
    cwd_on_path_at_start = any(os.path.abspath(p or ".") == os.getcwd() for p in sys.path)
    comm = MPI.COMM_WORLD
    tokens = data.load_tokens(None, max_bytes=64 * 1024)
    results = []
    for case in CASES:
        gathered = comm.gather(run_case(comm, case, tokens), root=0)
        if comm.Get_rank() == 0:
            name, V, M, tie = case
            results.append({
                "schedule": name, "virtual": V, "microbatches": M, "tie": tie,
                "loss_rel": max(g["loss"] for g in gathered),
                "grad_rel": max(g["grad"] for g in gathered),
                "param_rel": max(g["param"] for g in gathered),
                "norm_rel": max(g["norm"] for g in gathered),
                "clipped": gathered[0]["clipped"],
                "names_per_rank": [g["names"] for g in gathered],
                "kinds_per_rank": [g["kinds"] for g in gathered],
                "bounds": gathered[0]["bounds"],
                "cwd_on_path_at_start": cwd_on_path_at_start,
                "module_file": sys.modules["examples.own_model"].__file__,
            })  # fmt: skip
    if comm.Get_rank() == 0:
        with open(sys.argv[1], "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
