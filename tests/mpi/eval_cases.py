"""Validation loss through the pipeline equals the single-process oracle, in ONE launch.

Usage: mpiexec -n 4 python -m mpi4py tests/mpi/eval_cases.py WORKDIR OUT.json
Each layout trains STEPS steps through the real loop (train.loop.step_loop) with
train.eval_every = EVERY; layouts of fewer ranks run on sub-communicators of the same launch.
Rank 0 writes {case: record}; the cli case leaves a checkpoint for `hpcpipe eval`.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from mpi4py import MPI

from hpcpipe import data
from hpcpipe.config import build_config
from hpcpipe.parallel.grid import Grid, Topology
from hpcpipe.train import state as train_state
from hpcpipe.train.loop import step_loop
from hpcpipe.train.serial import SerialTrainer
from hpcpipe.train.trainer import PipelineTrainer, make_blueprint

STEPS, EVERY = 5, 2  # evaluations after steps 2 and 4, and after the last one (5)
MAX_BYTES = 64 * 1024  # what `hpcpipe eval` loads too (the checkpoint records data.max_bytes)
MODELS = {
    "gpt2": {"n_layers": 6, "d_model": 16, "n_heads": 2, "seq_len": 8},
    "llama": {"arch": "llama", "n_layers": 4, "d_model": 16, "n_heads": 4, "n_kv_heads": 2,
              "ffn_hidden": 32, "seq_len": 8},
}  # fmt: skip
# case -> (dp, pp, tp, schedule, V, arch)
LAYOUTS = {
    "pp2-1f1b": (1, 2, 1, "1f1b", 1, "gpt2"),
    "pp4-1f1b": (1, 4, 1, "1f1b", 1, "gpt2"),
    "dp2tp2-1f1b": (2, 1, 2, "1f1b", 1, "gpt2"),
    "pp2-interleaved": (1, 2, 1, "interleaved", 2, "gpt2"),
    "pp4-interleaved-zb": (1, 4, 1, "interleaved-zb", 2, "gpt2"),
    "llama-dp2pp2-zb-h1": (2, 2, 1, "zb-h1", 1, "llama"),
    "llama-pp2tp2-1f1b": (1, 2, 2, "1f1b", 1, "llama"),
}


def config(dp, pp, tp, schedule, V, arch, steps=STEPS, every=EVERY, **extra):
    sections = {
        "model": MODELS[arch],
        "train": {"global_batch": 8, "steps": steps, "dtype": "float64", "lr": 1e-2,
                  "warmup_steps": 1, "seed": 5, "eval_every": every, "eval_batches": 3},
        "parallel": {"dp": dp, "pp": pp, "tp": tp, "timeout": 60},
        "schedule": {"name": schedule, "microbatches": 2, "virtual": V},
        "data": {"max_bytes": MAX_BYTES},
    }  # fmt: skip
    for dotted, value in extra.items():
        section, key = dotted.split("__")
        sections.setdefault(section, {})[key] = value
    return build_config(sections)


def on_ranks(world, size):
    """A communicator of the first `size` ranks (COMM_NULL elsewhere)."""
    return world.Split(0 if world.Get_rank() < size else MPI.UNDEFINED, world.Get_rank())


def trainer_on(comm, cfg, tokens) -> PipelineTrainer:
    p = cfg.parallel
    grid = Grid(comm, Topology(p.dp, p.pp, p.tp))
    return PipelineTrainer(cfg, grid, make_blueprint(cfg, comm.Get_size()), tokens=tokens)


def watch(trainer: PipelineTrainer) -> dict:
    """Record what each evaluation's runtime held: its peak and what it kept afterwards."""
    seen = {"peaks": [], "kept": [], "sampler": []}
    evaluate = trainer.evaluate

    def position():
        return trainer.sampler.state_dict() if trainer.sampler else None

    def watched() -> float:
        before = position()
        loss = evaluate()
        runtime = trainer.eval_runtime
        seen["peaks"].append(trainer.last_eval.peak_activations)
        seen["kept"].append(len(runtime._state) + runtime._held)
        seen["sampler"].append(before == position())
        return loss

    trainer.evaluate = watched
    return seen


def quiet(_line: str) -> None:
    pass


def oracle(arch: str, tokens) -> dict:
    """The single-process run: {step: (loss, val_loss)} at every evaluation step."""
    serial = SerialTrainer(config(1, 1, 1, "1f1b", 1, arch), tokens=tokens)
    out = {}
    for step in range(1, STEPS + 1):
        loss = serial.forward_backward()
        serial.finish_step()
        if step % EVERY == 0 or step == STEPS:
            out[step] = (loss, serial.evaluate())
    return out


def layout_case(world, name, tokens, refs, workdir) -> dict | None:
    """Train one layout through step_loop; compare each val_loss with the oracle's."""
    dp, pp, tp, schedule, V, arch = LAYOUTS[name]
    sub = on_ranks(world, dp * pp * tp)
    result = None
    if sub != MPI.COMM_NULL:
        extra = {}
        if name == "pp4-1f1b":  # leaves a checkpoint for `hpcpipe eval`
            extra = {"checkpoint__dir": str(workdir / "cli"), "checkpoint__at_end": True}
        trainer = trainer_on(sub, config(dp, pp, tp, schedule, V, arch, **extra), tokens)
        seen = watch(trainer)
        records = step_loop(trainer, None, quiet, None)
        evaluated = {r["step"]: r for r in records if "val_loss" in r}
        ref = refs[arch]
        worst = max(abs(evaluated[s]["val_loss"] - v) / v for s, (_, v) in ref.items())
        loss = max(abs(evaluated[s]["loss"] - r) / r for s, (r, _) in ref.items())
        result = {
            "steps": sorted(evaluated),
            "oracle_steps": sorted(ref),
            "val_rel": worst,
            "loss_rel": loss,
            "ppl_ok": all(
                abs(r["val_ppl"] - math.exp(r["val_loss"])) <= 1e-12 * r["val_ppl"]
                for r in evaluated.values()
            ),
            "peaks": sub.allgather(max(seen["peaks"])),
            "kept": sub.allgather(max(seen["kept"])),
            "sampler_untouched": all(sub.allgather(all(seen["sampler"]))),
            "val_loss": {s: r["val_loss"] for s, r in evaluated.items()},
        }
        trainer.grid.free()
        sub.Free()
    world.Barrier()
    return result


def resume_case(world, tokens, workdir) -> dict:
    """eval_every on: a run stopped at step 3 (exit_interval) and resumed repeats the
    uninterrupted run's losses and val_losses bit for bit; without evaluation the training
    losses are the same bits too (evaluation changes no training state)."""
    layout = (2, 2, 1, "1f1b", 1, "gpt2")
    ckpt = workdir / "resume"
    steps = {"steps": 6, "every": 2}
    whole = step_loop(trainer_on(world, config(*layout, **steps), tokens), None, quiet, None)
    plain = step_loop(
        trainer_on(world, config(*layout, steps=6, every=0), tokens), None, quiet, None
    )
    first = config(*layout, **steps, checkpoint__dir=str(ckpt), train__exit_interval=3)
    part = step_loop(trainer_on(world, first, tokens), None, quiet, None)
    again = trainer_on(world, config(*layout, **steps, checkpoint__dir=str(ckpt)), tokens)
    train_state.restore(again, ckpt)
    rest = step_loop(again, None, quiet, None)
    return {
        "whole": [(r["step"], r["loss"], r.get("val_loss")) for r in whole],
        "resumed": [(r["step"], r["loss"], r.get("val_loss")) for r in part + rest],
        "plain_losses": [r["loss"] for r in plain],
    }


def main() -> None:
    torch.set_num_threads(1)
    world = MPI.COMM_WORLD
    workdir = Path(sys.argv[1])
    tokens = data.load_tokens(None, max_bytes=MAX_BYTES)
    refs = {arch: oracle(arch, tokens) for arch in MODELS}
    results = {}
    for name in LAYOUTS:
        results[name] = layout_case(world, name, tokens, refs, workdir)
    results["resume"] = resume_case(world, tokens, workdir)
    results["cli"] = {"checkpoint": str(workdir / "cli"), "val_loss": refs["gpt2"][STEPS][1]}
    if world.Get_rank() == 0:
        Path(sys.argv[2]).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
