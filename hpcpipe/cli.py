"""Command line: `hpcpipe train|schedule|data|topology` (also `python -m hpcpipe`)."""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from . import config as cfg
from . import data


def _train_parser(sub) -> None:
    keys = "\n".join(f"  --{k}=VALUE" for k in cfg.all_keys())
    short = "\n".join(f"  --{k:<13} same as --{v}" for k, v in cfg.SHORT_FLAGS.items())
    p = sub.add_parser(
        "train",
        help="train a GPT with pipeline parallelism (run under mpiexec -n N)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a GPT across MPI ranks. Every config key can be overridden:\n"
        f"{keys}\nShort forms:\n{short}",
    )
    p.add_argument("--config", help="TOML file with [model] [train] [parallel] [schedule] [data]")
    p.add_argument("--metrics", help="write one JSON object per step to this file (rank 0)")
    for flag, dotted in cfg.SHORT_FLAGS.items():
        p.add_argument(f"--{flag}", dest=f"short_{flag}", metavar="VALUE", help=f"= --{dotted}")
    p.set_defaults(func=run_train)


def _schedule_parser(sub) -> None:
    p = sub.add_parser("schedule", help="print a pipeline schedule (no MPI needed)")
    p.add_argument("--schedule", default="1f1b", help="schedule name: gpipe, 1f1b")
    p.add_argument("--stages", type=int, required=True, help="K, the number of pipeline ranks")
    p.add_argument("--microbatches", type=int, required=True, help="M, micro-batches per step")
    p.add_argument("--format", choices=["grid", "csv"], default="grid")
    p.set_defaults(func=run_schedule)


def _topology_parser(sub) -> None:
    p = sub.add_parser("topology", help="print which world rank has which (dp, pp, tp)")
    p.add_argument("--dp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--order", default="dp,pp,tp", help="axis nesting, last varies fastest")
    p.set_defaults(func=run_topology)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="hpcpipe", description="Pipeline-parallel GPT training over MPI"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _schedule_parser(sub)
    _topology_parser(sub)
    data.add_data_parser(sub)
    return parser


def split_overrides(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Pull `--section.key=value` / `--section.key value` out of argv."""
    rest, overrides = [], {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        name = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
        if "." in name:
            if "=" in arg:
                overrides[name] = arg.split("=", 1)[1]
            elif i + 1 < len(argv):
                overrides[name] = argv[i + 1]
                i += 1
            else:
                raise cfg.ConfigError(f"--{name} needs a value (--{name}=VALUE)")
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def _report(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_train(args) -> int:
    """Parse the config, check it on every rank before any communication, then train."""
    from mpi4py import MPI  # imported here: other subcommands must not need MPI

    from .train import train

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    try:
        overrides = dict(args.overrides)
        for flag, dotted in cfg.SHORT_FLAGS.items():
            value = getattr(args, f"short_{flag}")
            if value is not None:
                overrides[dotted] = value
        config = cfg.load_config(args.config, overrides)
        from .train import make_plan

        make_plan(config, comm.Get_size())
    except cfg.ConfigError as exc:
        # Every rank reaches the same verdict from the same inputs, so all exit without waiting.
        _report(f"hpcpipe: configuration error (rank {rank}): {exc}")
        return 2
    try:
        train(config, comm, metrics_path=args.metrics)
    except BaseException as exc:  # noqa: BLE001 - any failure must bring the whole job down
        _report(f"hpcpipe: world rank {rank} failed: {exc}\n{traceback.format_exc()}")
        comm.Abort(1)
    return 0


def run_schedule(args) -> int:
    """Print a schedule as a rank x time grid or as CSV."""
    from .schedule import ScheduleError, build_schedule, render_grid, to_csv

    try:
        schedule = build_schedule(args.schedule, args.stages, args.microbatches)
    except ScheduleError as exc:
        _report(f"hpcpipe schedule: {exc}")
        return 2
    if args.format == "csv":
        print(to_csv(schedule), end="")
    else:
        print(render_grid(schedule, args.stages, args.microbatches))
    return 0


def run_topology(args) -> int:
    """Print world rank -> coordinates (and host, under mpiexec with as many ranks)."""
    from .grid import Topology

    topology = Topology.parse(args.dp, args.pp, args.tp, args.order)
    print(topology.describe())
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `hpcpipe` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        rest, overrides = split_overrides(argv)
    except cfg.ConfigError as exc:
        _report(f"hpcpipe: configuration error: {exc}")
        return 2
    args = build_parser().parse_args(rest)
    args.overrides = overrides
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
