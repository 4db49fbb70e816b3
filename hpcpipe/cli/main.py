"""Command line: `hpcpipe train|schedule|plan|data|topology|...` (also `python -m hpcpipe`)."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import traceback
from pathlib import Path

from hpcpipe import config as cfg
from hpcpipe import data
from hpcpipe.cli.ckpt import add_ckpt_parser
from hpcpipe.cli.eval import add_eval_parser
from hpcpipe.cli.generate import add_generate_parser
from hpcpipe.cli.plan import add_plan_parser
from hpcpipe.models import BUILTIN, DEFAULT_ARCH


def _toml(value) -> str:
    """A default as it is written in TOML or after --section.key=."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, tuple):
        return f"[{', '.join(map(_toml, value))}]"
    return repr(value)


def key_help(arch: str = DEFAULT_ARCH, sections=None, skip=None) -> str:
    """`--section.key=VALUE  default: X  meaning` for each key of `sections` (default: all),
    from the config field docs; keys whose (default, doc) `skip` holds are left out."""
    wrap = textwrap.TextWrapper(
        100, initial_indent="  ", subsequent_indent=" " * 6, break_on_hyphens=False
    )
    lines = []
    for key, (default, doc) in cfg.key_docs(arch).items():
        if sections and key.split(".")[0] not in sections:
            continue
        if skip and skip.get(key) == (default, doc):
            continue
        lines.append(wrap.fill(f"--{key}=VALUE  default: {_toml(default)}  {doc}"))
    return "\n".join(lines)


_INTRO = textwrap.fill(
    "Train a model across MPI ranks. Every config key can be set in a [section] table of "
    "--config or overridden as --section.key=VALUE; the [model] keys are those of "
    f"model.arch={DEFAULT_ARCH} (model.arch=package.module:spec names your own family):",
    100,
)


def _train_parser(sub) -> None:
    from hpcpipe.pipeline.schedule import TRAINING_SCHEDULES

    shared = cfg.key_docs(DEFAULT_ARCH)
    families = "".join(
        f"\n[model] keys of model.arch={arch} (besides those above with the same default and "
        f"meaning):\n{key_help(arch, ('model',), shared)}"
        for arch in BUILTIN
        if arch != DEFAULT_ARCH
    )
    short = "\n".join(f"  --{k:<13} same as --{v}" for k, v in cfg.SHORT_FLAGS.items())
    p = sub.add_parser(
        "train",
        help="train a model with pipeline parallelism (run under mpiexec -n N)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"{_INTRO}\n{key_help()}\n{families}\nShort forms:\n{short}\n"
        f"Schedules (schedule.name): {', '.join(TRAINING_SCHEDULES)}",
    )
    p.add_argument("--config", help="TOML file with [model] [train] [parallel] [schedule] [data]")
    p.add_argument("--metrics", help="write one JSON object per step to this file (rank 0)")
    p.add_argument(
        "--tensorboard",
        metavar="DIR",
        help="write TensorBoard event files to DIR (rank 0): every number of the metrics record "
        "(loss, val_loss, lr, grad_norm, tokens_per_s, bubble, step_time, memory/*, loss_scale) "
        "at each step; needs `pip install tensorboard`; view with `tensorboard --logdir DIR`",
    )
    p.add_argument(
        "--trace",
        help="time every action of the last step on every rank; write one Chrome/Perfetto "
        "trace (open in ui.perfetto.dev or chrome://tracing) with the measured bubble",
    )
    p.add_argument(
        "--resume",
        metavar="auto|PATH",
        help="continue from a checkpoint: `auto` = the newest valid one in checkpoint.dir "
        "(falls back past damaged ones with a warning), or a step folder / run folder",
    )
    p.add_argument(
        "--init-from",
        metavar="PATH",
        help="start at step 0 (fresh optimizer and data order) from the weights of an hpcpipe "
        "checkpoint (step or run folder) or a Hugging Face folder (config.json + safetensors), "
        "on any layout; the [model] section comes from PATH (keys you set must agree; "
        "model.seq_len may be shorter). A checkpoint --resume finds wins over it",
    )
    for flag, dotted in cfg.SHORT_FLAGS.items():
        p.add_argument(f"--{flag}", dest=f"short_{flag}", metavar="VALUE", help=f"= --{dotted}")
    p.set_defaults(func=run_train)


def _schedule_parser(sub) -> None:
    from hpcpipe.pipeline.schedule import FORWARD_SCHEDULES, TRAINING_SCHEDULES

    p = sub.add_parser(
        "schedule",
        help="print, simulate or draw a pipeline schedule (no MPI needed)",
        description="Generate a schedule, validate it, simulate it with a cost model and print "
        "it. With --fit TRACE, the costs are fitted from a measured `hpcpipe train --trace` run "
        "and the command predicts the given schedule/M/V.",
    )
    names = sorted([*TRAINING_SCHEDULES, *FORWARD_SCHEDULES])  # forward-only: what evaluation runs
    p.add_argument("--schedule", default="1f1b", choices=names, help="schedule name")
    p.add_argument("--stages", type=int, help="K, the number of pipeline ranks")
    p.add_argument("--microbatches", type=int, help="M, micro-batches per step")
    p.add_argument("--virtual", type=int, default=1, help="V, model chunks per rank")
    p.add_argument(
        "--costs",
        default="1,1,1,0",
        help="T_F,T_B,T_W,T_comm: one rank's share per micro-batch (W is folded into B for "
        "schedules without the split); default 1,1,1,0",
    )
    p.add_argument("--fit", metavar="TRACE", help="fit the costs from a measured trace")
    p.add_argument(
        "--memory-limit",
        type=float,
        default=1.0,
        help="zb-auto: micro-batches held per rank as a multiple of 1F1B's peak (default 1.0; "
        "2.0 = the Zero Bubble paper's ZB-2p); zb-auto also reads --costs / --fit",
    )
    p.add_argument(
        "--measured",
        metavar="TRACE",
        help="draw the measured timeline of a `hpcpipe train --trace` run (png or chrome)",
    )
    p.add_argument(
        "--csv",
        metavar="FILE",
        help="read the schedule from a CSV (--format csv's, or torch's _dump_csv) instead of "
        "--schedule; K, M and V come from the file",
    )
    p.add_argument("--format", choices=["grid", "json", "csv", "png", "chrome"], default="grid")
    p.add_argument(
        "--compute-only",
        action="store_true",
        help="--format csv without SEND/RECV: torch's compute_only format (what every torch "
        "multi-stage schedule's _load_csv reads); default: with them (compute_comms)",
    )
    p.add_argument("--out", help="output file (required for png; default stdout otherwise)")
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
    add_ckpt_parser(sub)
    add_eval_parser(sub)
    add_generate_parser(sub)
    add_plan_parser(sub)
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

    from hpcpipe.train.loop import train

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    try:
        overrides = dict(args.overrides)
        for flag, dotted in cfg.SHORT_FLAGS.items():
            value = getattr(args, f"short_{flag}")
            if value is not None:
                overrides[dotted] = value
        if args.init_from:
            from hpcpipe.train import init_from

            config = init_from.load_config(args.config, overrides, args.init_from)
        else:
            config = cfg.load_config(args.config, overrides)
        from hpcpipe.train.elastic import replan
        from hpcpipe.train.fault import injection_from_env
        from hpcpipe.train.trainer import make_blueprint

        injection_from_env()  # a malformed HPCPIPE_FAULT is a configuration error too
        if args.tensorboard:
            from hpcpipe.train.logs import require_tensorboard

            require_tensorboard()  # on every rank: the same verdict, before any message
        effective = replan(config, comm.Get_size())[0] if config.parallel.elastic else config
        e = effective.parallel
        make_blueprint(
            effective, e.dp * e.pp * e.tp if config.parallel.elastic else comm.Get_size()
        )
        if args.init_from:
            init_from.check_weights(config, args.init_from)  # names and shapes, from headers
    except ValueError as exc:  # ConfigError, and HPCPIPE_FAULT's ValueError
        # Every rank reaches the same verdict from the same inputs, so all exit without waiting.
        _report(f"hpcpipe: configuration error (rank {rank}): {exc}")
        return 2
    from hpcpipe.train.fault import EXIT_REQUEUE, Stopped

    try:
        train(
            config,
            comm,
            args.metrics,
            trace_path=args.trace,
            resume=args.resume,
            init_from=args.init_from,
            tensorboard=args.tensorboard,
        )
    except Stopped:
        return EXIT_REQUEUE
    except BaseException as exc:  # noqa: BLE001 - any failure must bring the whole job down
        _report(
            f"hpcpipe: world rank {rank} failed: {exc}\n{traceback.format_exc()}"
            "hpcpipe: to continue from the newest checkpoint, relaunch with --resume auto "
            "(on fewer ranks add --parallel.elastic=true; jobs/local/resilient.sh does both; "
            "with Open MPI, `mpiexec --with-ft ulfm` recovers from a dead rank inside the job)"
        )
        comm.Abort(1)
    return 0


def run_schedule(args) -> int:
    """Print a schedule as a grid, JSON (with the simulation), CSV, PNG or Chrome trace."""
    from hpcpipe.cli import schedule as schedule_cli

    try:
        text = schedule_cli.render(args)
    except ValueError as exc:  # ScheduleError and bad --costs are ValueErrors
        _report(f"hpcpipe schedule: {exc}")
        return 2
    if text is not None:
        if args.out:
            Path(args.out).write_text(text)
        else:
            print(text, end="" if text.endswith("\n") else "\n")
    return 0


def _launched_by_mpi() -> bool:
    """True under mpiexec/srun with more than one rank (no MPI import needed to tell)."""
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "SLURM_NTASKS"):
        if int(os.environ.get(var, "1") or 1) > 1:
            return True
    return False


def run_topology(args) -> int:
    """Print world rank -> coordinates; under mpiexec, with each rank's host."""
    from hpcpipe.parallel.grid import Topology

    try:
        topology = Topology.parse(args.dp, args.pp, args.tp, args.order)
    except ValueError as exc:
        _report(f"hpcpipe topology: {exc}")
        return 2
    if not _launched_by_mpi():
        print(topology.describe())
        return 0
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    if comm.Get_size() != topology.size:
        if comm.Get_rank() == 0:
            _report(
                f"hpcpipe topology: dp={args.dp} x pp={args.pp} x tp={args.tp} = "
                f"{topology.size} ranks, but mpiexec started {comm.Get_size()}"
            )
        return 2
    hosts = comm.gather(MPI.Get_processor_name(), root=0)
    if comm.Get_rank() == 0:
        print(topology.describe(hosts))
        tp_hosts = {tuple(sorted({hosts[r] for r in topology.axis_group(g, "tp")}))
                    for g in range(topology.size)}  # fmt: skip
        if any(len(h) > 1 for h in tp_hosts):
            print("warning: some tp groups span several hosts; put tp innermost "
                  "(--order dp,pp,tp) and keep tp <= GPUs per node")  # fmt: skip
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
