"""--init-from and the checkpoints `ckpt export --format hf` reads, under MPI (one launch).

Usage: mpiexec -n 2 python -m mpi4py tests/mpi/hf_cases.py WORKDIR OUT.json
WORKDIR holds gpt2_hf/ and llama_hf/ (Hugging Face folders the test saved with transformers)
and bad_rope/ (one with rope_scaling). In order:
  1. `hpcpipe train` (the CLI's main, pp=2, 2 steps, checkpoint.at_end) of four tiny models,
     GPT-2 and Llama, tied and untied: the test exports them afterwards;
  2. --init-from each HF folder on 1 rank (a sub-communicator) and on dp=2, pp=2, tp=2:
     the losses of two steps;
  3. the CLI with --init-from: an HF folder on tp=2, an hpcpipe checkpoint on pp=2, and
     --resume auto finding a checkpoint (it wins over --init-from);
  4. configuration errors through the CLI (exit code 2 on every rank).
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import torch
from mpi4py import MPI

from hpcpipe import data
from hpcpipe.cli.main import main as cli_main
from hpcpipe.parallel.grid import Grid, Topology
from hpcpipe.train import init_from
from hpcpipe.train.trainer import PipelineTrainer, make_blueprint

MAX_BYTES = 64 * 1024
TRAIN = ["--train.global_batch=4", "--microbatches", "2", f"--data.max_bytes={MAX_BYTES}"]
SHAPE = ["--model.n_layers=2", "--model.d_model=16", "--model.seq_len=8"]
GPT2 = ["--model.arch=gpt2", *SHAPE, "--model.n_heads=2", "--model.activation=gelu_tanh",
        "--model.max_positions=12"]  # fmt: skip
LLAMA = ["--model.arch=llama", *SHAPE, "--model.n_heads=4", "--model.n_kv_heads=2",
         "--model.ffn_hidden=24"]  # fmt: skip
CHECKPOINTS = {
    "gpt2_tied": GPT2 + ["--dtype", "float64"],
    "gpt2_untied": GPT2 + ["--model.tie_embeddings=false", "--dtype", "float32"],
    "llama_untied": LLAMA + ["--dtype", "float64"],
    "llama_tied": LLAMA + ["--model.tie_embeddings=true", "--dtype", "float32"],
}
LAYOUTS = [(2, 1, 1), (1, 2, 1), (1, 1, 2)]  # (dp, pp, tp) on both ranks


def cli(argv: list[str]) -> dict:
    """Run `hpcpipe ARGV` in this process; its exit code and output."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli_main(argv)
    return {"rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue()}


def run_config(folder, dp, pp, tp):
    overrides = {"train.dtype": "float64", "train.global_batch": 4, "train.steps": 2,
                 "schedule.microbatches": 2, "model.seq_len": 16,
                 "parallel.dp": dp, "parallel.pp": pp, "parallel.tp": tp}  # fmt: skip
    return init_from.build_config({}, overrides, folder)


def losses(comm, folder, layout, tokens, steps=2) -> list[float]:
    config = run_config(folder, *layout)
    p = config.parallel
    grid = Grid(comm, Topology(p.dp, p.pp, p.tp))
    trainer = PipelineTrainer(config, grid, make_blueprint(config, comm.Get_size()), tokens=tokens)
    init_from.load_into(trainer, folder)
    out = [trainer.train_step()["loss"] for _ in range(steps)]
    grid.free()
    return out


def one_rank(world, fn):
    """fn(COMM_SELF) on rank 0, its result on every rank."""
    value = fn(MPI.COMM_SELF) if world.Get_rank() == 0 else None
    return world.bcast(value, root=0)


def metrics_losses(path: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in path.read_text().splitlines()]


def main():
    torch.set_num_threads(1)
    world = MPI.COMM_WORLD
    work, out = Path(sys.argv[1]), sys.argv[2]
    results: dict = {"train": {}, "layouts": {}, "cli": {}, "errors": {}}
    # 1. checkpoints to export
    for name, flags in CHECKPOINTS.items():
        where = f"--checkpoint.dir={work / ('ck_' + name)}"
        argv = ["train", "--pp", "2", "--steps", "2", *TRAIN, *flags, "--checkpoint.at_end=true"]
        results["train"][name] = cli([*argv, where])
    # 2. HF folders on every layout, against one rank
    tokens = data.load_tokens(None, max_bytes=MAX_BYTES)
    for family in ("gpt2", "llama"):
        folder = work / f"{family}_hf"
        got = {"1x1x1": one_rank(world, lambda c, f=folder: losses(c, f, (1, 1, 1), tokens))}
        for layout in LAYOUTS:
            got["x".join(map(str, layout))] = losses(world, folder, layout, tokens)
        results["layouts"][family] = got
    # 3. the CLI: an HF folder on tp=2, an hpcpipe checkpoint on pp=2, --resume over --init-from
    metrics = work / "tp2.jsonl"
    run = cli(["train", "--init-from", str(work / "gpt2_hf"), "--tp", "2", "--steps", "1",
               "--dtype", "float64", "--model.seq_len=16", *TRAIN, "--metrics", str(metrics),
               f"--checkpoint.dir={work / 'ck_cli_tp2'}"])  # fmt: skip
    run["losses"] = metrics_losses(metrics) if run["rc"] == 0 and world.Get_rank() == 0 else None
    results["cli"]["hf_tp2"] = run
    ckpt = work / "ck_llama_untied"
    metrics = work / "pp2.jsonl"
    run = cli(["train", "--init-from", str(ckpt), "--pp", "2", "--steps", "1",
               "--dtype", "float64", *TRAIN, "--metrics", str(metrics),
               f"--checkpoint.dir={work / 'ck_cli_pp2'}"])  # fmt: skip
    run["losses"] = metrics_losses(metrics) if run["rc"] == 0 and world.Get_rank() == 0 else None

    def reference(comm):
        config = init_from.build_config(
            {}, {"train.dtype": "float64", "train.global_batch": 4, "schedule.microbatches": 2,
                 "data.max_bytes": MAX_BYTES}, ckpt)  # fmt: skip
        trainer = PipelineTrainer(config, Grid(comm, Topology(1, 1, 1)), make_blueprint(config, 1))
        init_from.load_into(trainer, ckpt)
        return trainer.train_step()["loss"]

    run["reference"] = one_rank(world, reference)
    results["cli"]["ckpt_pp2"] = run
    resumed = work / "ck_gpt2_tied"
    results["cli"]["resume_wins"] = cli(
        ["train", "--init-from", str(resumed), "--resume", "auto", "--pp", "2", "--steps", "3",
         "--dtype", "float64", *TRAIN, f"--checkpoint.dir={resumed}"]
    )  # fmt: skip
    # 4. configuration errors
    cases = {
        "disagree": ["--init-from", str(work / "llama_hf"), "--model.d_model=64"],
        "missing": ["--init-from", str(work / "nope")],
        "unsupported": ["--init-from", str(work / "bad_rope")],
    }
    for name, argv in cases.items():
        results["errors"][name] = cli(["train", "--pp", "2", *TRAIN, *argv])
    # every rank's outcome of the CLI runs, for the messages on every rank
    gathered = world.gather(results, root=0)
    if world.Get_rank() == 0:
        merged = gathered[0]
        for group in ("train", "cli", "errors"):
            for name in merged[group]:
                merged[group][name] = [g[group][name] for g in gathered]
        Path(out).write_text(json.dumps(merged, indent=1))


if __name__ == "__main__":
    main()
