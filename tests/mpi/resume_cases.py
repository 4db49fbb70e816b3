"""Save at step k on pp=4, resume on other layouts: losses equal an uninterrupted run.

Usage: mpiexec -n 4 python -m mpi4py tests/mpi/resume_cases.py WORKDIR OUT.json
Smaller layouts run on sub-communicators of the same launch (one start-up for all of them).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from mpi4py import MPI

from hpcpipe import data
from hpcpipe.checkpoint.manifest import read_manifest
from hpcpipe.config import build_config
from hpcpipe.parallel.grid import Grid, Topology
from hpcpipe.train import state as train_state
from hpcpipe.train.trainer import PipelineTrainer, make_blueprint

STEPS, SAVE_AT = 6, 3
TINY = {"n_layers": 4, "d_model": 16, "n_heads": 2, "seq_len": 8}
# Llama with grouped-query attention (2 key/value heads for 4 query heads): tp=2 splits groups.
LLAMA = {"arch": "llama", "n_layers": 4, "d_model": 16, "n_heads": 4, "n_kv_heads": 2,
         "ffn_hidden": 32, "seq_len": 8}  # fmt: skip
MODELS = {"gpt2": TINY, "llama": LLAMA, "llama-tied": {**LLAMA, "tie_embeddings": True}}
# (dp, pp, tp, schedule) to resume on; pp=3 splits the 6 layers unevenly by cost.
LAYOUTS = [(1, 4, 1, "1f1b"), (1, 2, 1, "gpipe"), (1, 3, 1, "zb-h1"), (1, 1, 1, "1f1b"),
           (1, 2, 2, "1f1b"), (2, 2, 1, "interleaved"), (2, 1, 2, "gpipe")]  # fmt: skip


def config(dp, pp, tp, schedule, dtype, ckpt_dir, model="gpt2", zero=0, microbatches=2):
    return build_config(
        {
            "model": MODELS[model],
            "train": {"global_batch": 8, "steps": STEPS, "dtype": dtype, "lr": 1e-2,
                      "warmup_steps": 1, "seed": 11},
            "parallel": {"dp": dp, "pp": pp, "tp": tp, "timeout": 60, "zero": zero},
            "schedule": {"name": schedule, "microbatches": microbatches,
                         "virtual": 2 if schedule == "interleaved" else 1},
            "checkpoint": {"dir": str(ckpt_dir), "keep": 2},
        }
    )  # fmt: skip


def trainer_on(comm, cfg, tokens):
    p = cfg.parallel
    grid = Grid(comm, Topology(p.dp, p.pp, p.tp))
    return PipelineTrainer(cfg, grid, make_blueprint(cfg, comm.Get_size()), tokens=tokens)


def run(trainer, until):
    """Losses of the steps up to `until` (every rank gets the same numbers)."""
    losses = []
    while trainer.step_index < until:
        losses.append(trainer.train_step()["loss"])
    return losses


def params_of(trainer) -> dict:
    return {n: p.detach().clone() for n, p in trainer.named_params}


RUNS = [("gpt2", "float64"), ("gpt2", "float32"), ("llama", "float64"), ("llama-tied", "float64")]
# ZeRO: (dp, pp, tp, zero) legs of one run, each resuming the previous leg's checkpoint
# (dp 2 -> 4 -> 1, zero 1 -> 1 -> 0 -> 1, pp and tp changing on the way).
ZERO_LEGS = [(2, 2, 1, 1), (4, 1, 1, 1), (1, 2, 2, 0), (2, 1, 2, 1), (1, 1, 1, 0)]
ZERO_STEPS = 2 * len(ZERO_LEGS)


def on_ranks(world, size):
    """A communicator of the first `size` ranks (COMM_NULL elsewhere)."""
    return world.Split(0 if world.Get_rank() < size else MPI.UNDEFINED, world.Get_rank())


def zero_chain(world, workdir, tokens, model) -> dict:
    """Save and resume along ZERO_LEGS; the losses must equal one uninterrupted run."""
    ckpt = workdir / f"zero-{model}"
    base = trainer_on(world, config(2, 2, 1, "1f1b", "float64", ckpt, model, 1), tokens)
    reference = run(base, ZERO_STEPS)
    resumed = []
    for leg, (dp, pp, tp, zero) in enumerate(ZERO_LEGS):
        sub = on_ranks(world, dp * pp * tp)
        if sub != MPI.COMM_NULL:
            cfg = config(dp, pp, tp, "1f1b", "float64", ckpt, model, zero)
            trainer = trainer_on(sub, cfg, tokens)
            if leg:
                train_state.restore(trainer, ckpt)
            resumed += run(trainer, 2 * (leg + 1))
            train_state.save(trainer, ckpt)
            sub.Free()
        world.Barrier()
    return {"reference": reference, "resumed": resumed}


# 2BW: (dp, pp, tp, zero) legs of 2 steps each; M = 4 >= pp - 1 everywhere.
TWO_BW_LEGS = [(1, 4, 1, 0), (2, 2, 1, 1), (1, 2, 2, 0), (1, 1, 1, 0)]


def two_bw_chain(world, workdir, tokens) -> dict:
    """2BW saved and resumed along TWO_BW_LEGS equals one uninterrupted 2BW run; the same
    layout resumes bitwise; a resume that drops the saved in-flight version (W(t-1) := W(t))
    does not equal it, so the version is what makes the resume exact."""

    def cfg(dp, pp, tp, zero, ckpt):
        return config(dp, pp, tp, "2bw", "float64", ckpt, zero=zero, microbatches=4)

    chain, same_dir = workdir / "two-bw", workdir / "two-bw-same"
    uninterrupted = trainer_on(world, cfg(1, 4, 1, 0, chain), tokens)
    reference = run(uninterrupted, 2 * len(TWO_BW_LEGS))
    resumed = []
    for leg, (dp, pp, tp, zero) in enumerate(TWO_BW_LEGS):
        sub = on_ranks(world, dp * pp * tp)
        if sub != MPI.COMM_NULL:
            trainer = trainer_on(sub, cfg(dp, pp, tp, zero, chain), tokens)
            if leg:
                train_state.restore(trainer, chain)
            resumed += run(trainer, 2 * (leg + 1))
            train_state.save(trainer, chain)
            sub.Free()
        world.Barrier()
    base = trainer_on(world, cfg(1, 4, 1, 0, same_dir), tokens)
    run(base, 2)
    train_state.save(base, same_dir)
    tail = run(base, 4)
    again = trainer_on(world, cfg(1, 4, 1, 0, same_dir), tokens)
    train_state.restore(again, same_dir)
    again_tail = run(again, 4)
    final = params_of(base)
    same = all(world.allgather(all(torch.equal(p, final[n]) for n, p in params_of(again).items())))
    dropped = trainer_on(world, cfg(1, 4, 1, 0, same_dir), tokens)
    train_state.restore(dropped, same_dir)
    dropped.sync_versions()  # forget W(t-1): what a checkpoint without it would give
    return {"reference": reference, "resumed": resumed, "bitwise_params": same,
            "tail": tail, "again": again_tail, "dropped": run(dropped, 4)}  # fmt: skip


def bf16_run(world, workdir, tokens, zero) -> dict:
    """bf16 mixed precision (ZeRO or not): the checkpoint holds float32 masters, and a resume
    on the same layout continues bitwise exactly."""
    ckpt = workdir / f"bf16-zero{zero}"
    cfg = config(2, 2, 1, "1f1b", "bfloat16", ckpt, "llama", zero)
    base = trainer_on(world, cfg, tokens)
    reference = run(base, STEPS)
    final = params_of(base)
    first = trainer_on(world, cfg, tokens)
    run(first, SAVE_AT)
    path = train_state.save(first, ckpt)
    trainer = trainer_on(world, cfg, tokens)
    train_state.restore(trainer, ckpt)
    resumed = run(trainer, STEPS)
    same = all(torch.equal(p, final[n]) for n, p in params_of(trainer).items())
    same = all(world.allgather(same))
    dtypes = sorted({t["dtype"] for t in read_manifest(path)["tensors"].values()})
    half = any(p.dtype == torch.bfloat16 for p in trainer.params)
    return {"reference": reference[SAVE_AT:], "resumed": resumed, "bitwise_params": same,
            "saved_dtypes": dtypes, "params_bf16": half}  # fmt: skip


def main():
    torch.set_num_threads(1)
    world = MPI.COMM_WORLD
    workdir, out = Path(sys.argv[1]), sys.argv[2]
    tokens = data.load_tokens(None, max_bytes=32 * 1024)
    results = {}
    for model, dtype in RUNS:
        ckpt = workdir / f"run-{model}-{dtype}"
        base = trainer_on(world, config(1, 4, 1, "1f1b", dtype, ckpt, model), tokens)
        reference = run(base, STEPS)
        final = params_of(base)
        first = trainer_on(world, config(1, 4, 1, "1f1b", dtype, ckpt, model), tokens)
        run(first, SAVE_AT)
        train_state.save(first, ckpt)
        for dp, pp, tp, schedule in LAYOUTS if dtype == "float64" else LAYOUTS[:1]:
            size = dp * pp * tp
            sub = world.Split(0 if world.Get_rank() < size else MPI.UNDEFINED, world.Get_rank())
            if sub != MPI.COMM_NULL:
                cfg = config(dp, pp, tp, schedule, dtype, ckpt, model)
                trainer = trainer_on(sub, cfg, tokens)
                train_state.restore(trainer, ckpt)
                resumed = run(trainer, STEPS)
                same_params = dtype == "float32" and all(
                    torch.equal(p, final[n]) for n, p in params_of(trainer).items()
                )
                prefix = "" if model == "gpt2" else f"{model}-"
                key = f"{prefix}{dtype}-dp{dp}pp{pp}tp{tp}-{schedule}"
                if sub.Get_rank() == 0:
                    results[key] = {"reference": reference[SAVE_AT:], "resumed": resumed,
                                    "bitwise_params": same_params}  # fmt: skip
                sub.Free()
            world.Barrier()
    for model in ("gpt2", "llama-tied"):
        results[f"zero-chain-{model}"] = zero_chain(world, workdir, tokens, model)
    for zero in (0, 1):
        results[f"bf16-zero{zero}"] = bf16_run(world, workdir, tokens, zero)
    results["two-bw"] = two_bw_chain(world, workdir, tokens)
    if world.Get_rank() == 0:
        Path(out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
