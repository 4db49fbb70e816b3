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

import numpy as np
import torch
from mpi4py import MPI
from pipeline_case_list import bf16_cases, cases

from hpcpipe import data
from hpcpipe.config import build_config
from hpcpipe.parallel.grid import Grid, Topology
from hpcpipe.pipeline import twobw
from hpcpipe.pipeline.schedule import validate
from hpcpipe.train.serial import SerialTrainer
from hpcpipe.train.trainer import PipelineTrainer, make_blueprint

STEPS = 3
TINY = {"n_layers": 2, "d_model": 16, "n_heads": 2, "seq_len": 8, "vocab_size": 256}
# [model] tables by arch; Llama with grouped-query attention (2 query heads per kv head)
MODELS = {
    "gpt2": TINY,
    "llama": {"arch": "llama", "n_layers": 2, "d_model": 16, "n_heads": 4, "n_kv_heads": 2,
              "ffn_hidden": 32, "seq_len": 8, "vocab_size": 256},
}  # fmt: skip


def case_config(case: dict):
    M, V = case["microbatches"], case["virtual"]
    dp, pp, tp = case["layout"]
    model = MODELS[case["arch"]]
    return build_config(
        {
            "model": {**model, "n_layers": max(model["n_layers"], pp * V),
                      "tie_embeddings": case["tie"]},
            "train": {"global_batch": 2 * M * dp, "steps": STEPS, "dtype": case["dtype"],
                      "lr": 1e-2, "warmup_steps": 1, "grad_clip": 0.5, "seed": 7},
            "parallel": {"dp": dp, "pp": pp, "tp": tp, "timeout": 60, "zero": case["zero"]},
            "schedule": {"name": case["schedule"], "microbatches": M, "virtual": V,
                         "recompute": case["recompute"]},
        }
    )  # fmt: skip


def local_piece(trainer, name: str, local: torch.Tensor, full: torch.Tensor):
    """(this rank's tensor, the matching slice of the serial one), padding rows dropped."""
    spec = trainer.tp_specs.get(name)
    if spec is None:
        return local, full
    dim, offset, size = spec
    length = min(local.shape[dim], size - offset)
    return local.narrow(dim, 0, length), full.narrow(dim, offset, length)


def fragment_piece(trainer, name: str, fragment, full: torch.Tensor):
    """(this rank's reduced gradient fragment, the same elements of the serial gradient).

    A fragment is a flat range of the local (tp-sliced, maybe vocabulary-padded) parameter;
    the serial gradient is sliced, padded with zeros like the local tensor, and flattened.
    """
    shape = fragment.param.shape
    padded = torch.zeros(shape, dtype=full.dtype)
    real, ref = local_piece(trainer, name, padded, full)
    real.copy_(ref)
    real_mask = torch.zeros(shape, dtype=torch.bool)
    local_piece(trainer, name, real_mask, full)[0].fill_(True)
    span = slice(fragment.start, fragment.stop)
    keep = real_mask.reshape(-1)[span]
    return fragment.master.grad[keep], padded.reshape(-1)[span][keep].to(fragment.master.dtype)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative difference."""
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def run_case(comm, world: int, case: dict, tokens) -> dict:
    """Train STEPS steps both ways; return this rank's worst differences."""
    config = case_config(case)
    dp, pp, tp = case["layout"]
    grid = Grid(comm, Topology(dp, pp, tp))
    blueprint = make_blueprint(config, world)
    trainer = PipelineTrainer(config, grid, blueprint, tokens=tokens)
    oracle = SerialTrainer(config, tokens=tokens)
    worst = {"loss": 0.0, "grad": 0.0, "param": 0.0, "peak": [], "bound": 0}
    worst["bound"] = schedule_peak(blueprint, case)[grid.pp_rank]
    for _ in range(STEPS):
        result = trainer.forward_backward()
        ref_loss = oracle.forward_backward()
        ref_grads = oracle.grads()
        for name, fragment in trainer.grad_fragments():
            mine, ref = fragment_piece(trainer, name, fragment, ref_grads[name])
            worst["grad"] = max(worst["grad"], rel(mine, ref))
        record = trainer.finish_step(result)
        ref_norm = oracle.finish_step()
        worst["clipped"] = worst.get("clipped", False) or ref_norm > config.train.grad_clip
        worst["loss"] = max(worst["loss"], abs(record["loss"] - ref_loss) / abs(ref_loss))
        worst["norm"] = max(worst.get("norm", 0.0), abs(record["grad_norm"] - ref_norm) / ref_norm)
        worst["peak"].append(result.peak_activations)
    ref_params = oracle.params()
    for name, p in local_params(trainer):
        mine, ref = local_piece(trainer, name, p.detach(), ref_params[name])
        worst["param"] = max(worst["param"], rel(mine, ref))
    grid.free()
    return worst


def schedule_peak(blueprint, case: dict) -> dict[int, int]:
    """Per-rank peak micro-batches by the schedule's own analysis (2bw: over its steps)."""
    pp, M, V = case["layout"][1], case["microbatches"], case["virtual"]
    if case["schedule"] == twobw.NAME:
        return twobw.peak_activations(pp, M)
    return validate(blueprint.schedule, pp, M, V).peak_activations


def local_params(trainer: PipelineTrainer):
    """(global name, parameter) of every stage this rank holds."""
    stages = trainer.stages.values()
    return [kv for stage in stages for kv in stage.named_parameters(remove_duplicate=False)]


def bf16_reduction_case(comm, case: dict, tokens) -> dict:
    """bf16 compute: gradients are float32, and their dp mean equals float32 sums of the same
    local float32 gradients (no 16-bit rounding anywhere on the way)."""
    config = case_config(case)
    dp, pp, tp = case["layout"]
    grid = Grid(comm, Topology(dp, pp, tp))
    trainer = PipelineTrainer(config, grid, make_blueprint(config, comm.Get_size()), tokens=tokens)
    trainer.reducer.start_step()
    trainer.runtime.step(trainer.next_microbatches())
    local = [trainer.reducer.grad(p).clone() for p in trainer.params]  # before the dp reduction
    trainer.reducer.finish()
    equal = all(p.dtype == torch.bfloat16 and p.grad is None for p in trainer.params)
    for p, mine in zip(trainer.params, local, strict=True):
        wide = mine.numpy().copy()
        equal &= wide.dtype == np.float32
        grid.dp_comm.Allreduce(MPI.IN_PLACE, [wide, MPI.FLOAT], op=MPI.SUM)
        expected = torch.from_numpy(wide) * (1.0 / dp)
        equal &= torch.equal(trainer.reducer.grad(p), expected)
    grid.free()
    return {"bf16_equal": bool(equal), "loss": 0.0, "grad": 0.0, "param": 0.0, "norm": 0.0,
            "clipped": True, "peak": [0], "bound": 0}  # fmt: skip


def main() -> None:
    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    world = comm.Get_size()
    tokens = data.load_tokens(None, max_bytes=64 * 1024)
    results = []
    for case in cases(world) + bf16_cases(world):
        if case["dtype"] == "bfloat16":
            mine = bf16_reduction_case(comm, case, tokens)
        else:
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
                    "bf16_equal": all(g.get("bf16_equal", True) for g in gathered),
                }
            )
    if comm.Get_rank() == 0:
        with open(sys.argv[1], "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
