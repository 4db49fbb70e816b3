"""`hpcpipe eval --checkpoint PATH`: the validation loss of a saved model, on any layout.

PATH is what `train --init-from` takes: an hpcpipe checkpoint (step or run folder) or a Hugging
Face folder. The [model] section comes from PATH; from an hpcpipe checkpoint also its [data]
section (the same corpus, the same held-out windows) and the train.global_batch,
train.eval_batches, train.dtype and schedule.microbatches it trained with, so the loss equals
the val_loss the run logged at that step. --config and --section.key=value override them; the
layout (--pp --tp --dp, --schedule with --schedule.virtual) is this command's own, default 1.
"""

from __future__ import annotations

import json
import sys
import traceback
from dataclasses import fields

from hpcpipe import config as cfg

# What an evaluation takes over from the checkpoint's own config (besides [model]).
FROM_CHECKPOINT = {
    "data": None,  # every key of the section
    "train": ("global_batch", "eval_batches", "dtype"),
    "schedule": ("microbatches",),
}
_SECTIONS = {"data": cfg.DataSection, "train": cfg.TrainSection, "schedule": cfg.ScheduleSection}


def add_eval_parser(sub) -> None:
    """Register `hpcpipe eval` on the top-level subparsers."""
    short = ", ".join(f"--{k}" for k in cfg.SHORT_FLAGS)
    p = sub.add_parser(
        "eval",
        help="validation loss of a checkpoint on any layout (run under mpiexec -n N)",
        description=__doc__.split("\n", 2)[2].replace("\n", " ").strip()
        + f" Short forms as for train: {short}.",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="PATH",
        help="an hpcpipe checkpoint (step_<N> folder, or a run folder with `latest`) or a "
        "Hugging Face model folder",
    )
    p.add_argument("--config", help="TOML file whose keys override the checkpoint's")
    p.add_argument("--format", choices=["text", "json"], default="text")
    for flag, dotted in cfg.SHORT_FLAGS.items():
        p.add_argument(f"--{flag}", dest=f"short_{flag}", metavar="VALUE", help=f"= --{dotted}")
    p.set_defaults(func=run_eval)


def checkpoint_tables(path) -> tuple[dict, int | None]:
    """({section: keys} taken from an hpcpipe checkpoint's config, its step); ({}, None) for a
    Hugging Face folder."""
    from hpcpipe.checkpoint.manifest import read_manifest
    from hpcpipe.train import init_from

    src = init_from.source(path)
    if src.kind != init_from.HPCPIPE:
        return {}, None
    manifest = read_manifest(src.path)
    saved = manifest.get("config") or {}
    tables = {}
    for section, keys in FROM_CHECKPOINT.items():
        known = {f.name for f in fields(_SECTIONS[section])}
        wanted = known if keys is None else set(keys) & known
        values = saved.get(section) or {}
        tables[section] = {k: v for k, v in values.items() if k in wanted}
    return tables, (manifest.get("lr_schedule") or {}).get("step")


def eval_config(args) -> tuple[cfg.Config, int | None]:
    """The evaluation's config (ConfigError when it cannot run) and the checkpoint's step."""
    from hpcpipe.train import init_from

    overrides = dict(args.overrides)
    for flag, dotted in cfg.SHORT_FLAGS.items():
        value = getattr(args, f"short_{flag}")
        if value is not None:
            overrides[dotted] = value
    tables, step = checkpoint_tables(args.checkpoint)
    for section, values in cfg.read_tables(args.config).items():
        if isinstance(values, dict) and isinstance(tables.get(section), dict):
            values = {**tables[section], **values}
        tables[section] = values
    config = init_from.build_config(tables, cfg.parse_overrides(overrides), args.checkpoint)
    d = config.data
    if not d.val_fraction and not d.val_path:
        raise cfg.ConfigError(
            "nothing to evaluate on: data.val_fraction is 0 and data.val_path is empty; give "
            "--data.val_path=FILE (a token file) or --data.val_fraction=F"
        )
    return config, step


def evaluate_checkpoint(config: cfg.Config, comm, path) -> float:
    """Collective: build this rank's share of the model on config's layout, load PATH's
    weights into it and return the validation loss (the same on every rank)."""
    import torch

    from hpcpipe.parallel.grid import Grid, Topology
    from hpcpipe.train.init_from import load_into
    from hpcpipe.train.trainer import PipelineTrainer, make_blueprint, pick_device

    blueprint = make_blueprint(config, comm.Get_size())
    torch.set_num_threads(config.train.threads)
    p = config.parallel
    grid = Grid(comm, Topology.parse(p.dp, p.pp, p.tp, p.order))
    trainer = PipelineTrainer(config, grid, blueprint, device=pick_device(config, comm))
    load_into(trainer, path)
    loss = trainer.evaluate()
    grid.free()
    return loss


def describe(config: cfg.Config, path, step: int | None, loss: float) -> dict:
    """The result as --format json prints it."""
    from hpcpipe.train import evaluate as evaluation

    t, p = config.train, config.parallel
    return {
        "checkpoint": str(path),
        "step": step,
        **evaluation.metrics(loss),
        "windows": t.eval_batches * t.global_batch,
        "seq_len": config.model.seq_len,
        "dtype": t.dtype,
        "layout": {"dp": p.dp, "pp": p.pp, "tp": p.tp, "virtual": config.schedule.virtual},
    }


def run_eval(args) -> int:
    """Check the config on every rank before any communication, evaluate, rank 0 prints."""
    from mpi4py import MPI  # imported here: other subcommands must not need MPI

    from hpcpipe.train.trainer import make_blueprint

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    try:
        config, step = eval_config(args)
        make_blueprint(config, comm.Get_size())
        from hpcpipe.train import init_from

        init_from.check_weights(config, args.checkpoint)  # names and shapes, from headers
    except ValueError as exc:  # ConfigError
        # Every rank reaches the same verdict from the same inputs, so all exit without waiting.
        print(f"hpcpipe eval: configuration error (rank {rank}): {exc}", file=sys.stderr)
        return 2
    try:
        loss = evaluate_checkpoint(config, comm, args.checkpoint)
    except BaseException as exc:  # noqa: BLE001 - any failure must bring the whole job down
        print(f"hpcpipe eval: world rank {rank} failed: {exc}\n{traceback.format_exc()}",
              file=sys.stderr, flush=True)  # fmt: skip
        comm.Abort(1)
    if rank == 0:
        result = describe(config, args.checkpoint, step, loss)
        if args.format == "json":
            print(json.dumps(result))
        else:
            layout = " ".join(f"{k}={v}" for k, v in result["layout"].items())
            at = f" (step {step})" if step is not None else ""
            print(f"{args.checkpoint}{at}: val_loss {loss:.6f} | val_ppl {result['val_ppl']:.3f} "
                  f"| {result['windows']} windows of {result['seq_len']} tokens | "
                  f"{result['dtype']} on {layout}")  # fmt: skip
    return 0
