"""`hpcpipe plan`: choose a layout for a model on a cluster, or profile this machine for it.

hpcpipe plan [--config F] [--preset NAME] [--model.KEY=V ...] --gpus N --gpus-per-node G
             --device a100-80g|h100-80g|h200|PROFILE.json --global-batch B
             [--dp --pp --tp --microbatches] [--top K] [--format table|json]
             [--explain PNG]
mpiexec -n N hpcpipe plan --profile OUT.json [--model.KEY=V ...]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from hpcpipe import config as cfg
from hpcpipe.plan.presets import PRESETS, preset_overrides

DEFAULT_GPUS_PER_NODE = 8


def add_plan_parser(sub) -> None:
    from hpcpipe.plan.devices import DEVICES

    p = sub.add_parser(
        "plan",
        help="choose dp/pp/tp, V, M, schedule, recomputation and ZeRO for a model on a cluster "
        "(predicted step time, MFU, memory per GPU), or --profile this machine",
        description="Enumerate every layout of the model on --gpus GPUs, reject those that cannot "
        "run (saying why), rank the rest by predicted step time and print the best. Model keys "
        "as in `hpcpipe train` (--config, --model.KEY=VALUE, --train.dtype) or --preset.",
    )
    p.add_argument("--config", help="TOML file with the [model] (and [train]) keys")
    p.add_argument("--preset", choices=sorted(PRESETS), help="model keys of a known model")
    p.add_argument("--gpus", type=int, help="GPUs (ranks) in all; default: the profile's ranks")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per node (tp stays inside a node)")
    p.add_argument(
        "--device",
        default="h100-80g",
        help=f"{'|'.join(DEVICES)} or a PROFILE.json written by --profile, or several "
        "A.json,B.json of one machine merged by median (default h100-80g)",
    )
    p.add_argument("--global-batch", type=int, help="sequences per step (train.global_batch)")
    for axis in ("dp", "pp", "tp", "microbatches"):
        p.add_argument(f"--{axis}", type=int, help=f"fix {axis} instead of searching it")
    p.add_argument("--top", type=int, default=10, help="layouts to print (default 10)")
    p.add_argument("--max-virtual", type=int, default=4, help="largest V tried (default 4)")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.add_argument(
        "--explain",
        metavar="PNG",
        help="draw the chosen layout's simulated timeline to PNG and print its memory per rank",
    )
    p.add_argument(
        "--profile",
        metavar="OUT.json",
        help="under mpiexec: time this machine's layers of the model (F, B, W per micro-batch "
        "size and tp degree), its p2p and allreduce, into OUT.json for --device",
    )
    p.set_defaults(func=run_plan)


def load_plan_config(args) -> cfg.Config:
    """--config, then the preset, then --section.key overrides (the last wins)."""
    overrides = dict(preset_overrides(args.preset)) if args.preset else {}
    overrides.update(cfg.parse_overrides(args.overrides))
    if args.global_batch:
        overrides["train.global_batch"] = args.global_batch
    tables = cfg.read_tables(args.config)
    return cfg.build_config(tables, overrides)


def machine_for(args, spec, model):
    """A DeviceMachine for a device name, a ProfileMachine for a profile file."""
    from hpcpipe.plan.devices import DEVICES, device_by_name
    from hpcpipe.plan.machines import DeviceMachine, ProfileMachine

    if args.device in DEVICES:
        per_node = args.gpus_per_node or DEFAULT_GPUS_PER_NODE
        return DeviceMachine(device_by_name(args.device), per_node)
    # several profiles of one machine, comma-separated, are merged by median (plan/merge.py)
    paths = [p for p in args.device.split(",") if p]
    missing = [p for p in paths if not Path(p).exists()]
    if not paths or missing:
        raise ValueError(
            f"--device {', '.join(missing) or args.device!r} is neither a known device "
            f"({', '.join(DEVICES)}) nor a profile file; write one with "
            "`mpiexec -n N hpcpipe plan --profile OUT.json`"
        )
    from hpcpipe.plan.merge import load_profiles
    from hpcpipe.plan.profile import groups_of

    return ProfileMachine(load_profiles(paths), groups_of(spec, model))


def run_plan(args) -> int:
    if args.profile:
        return _run_profile(args)
    from hpcpipe.models import get_spec
    from hpcpipe.plan.search import search
    from hpcpipe.plan.timemodel import PlanModel

    started = time.perf_counter()
    try:
        config = load_plan_config(args)
        spec = get_spec(config.model.arch)
        machine = machine_for(args, spec, config.model)
        profiled = getattr(machine, "profile", None)  # a profile plans for its own ranks
        gpus = args.gpus or (profiled.world_size if profiled else None)
        if not gpus or gpus < 1:
            raise ValueError("--gpus N is required (the number of GPUs to plan for)")
        plan = PlanModel(spec, config.model, config.train.dtype, config.train.global_batch,
                         config.parallel.balance)  # fmt: skip
        fixed = {k: getattr(args, k) for k in ("dp", "pp", "tp", "microbatches")}
        result = search(plan, machine, gpus, args.gpus_per_node, fixed, args.top,
                        args.max_virtual)  # fmt: skip
    except ValueError as exc:
        print(f"hpcpipe plan: {exc}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - started
    from hpcpipe.plan import report

    if args.format == "json":
        print(json.dumps(report.to_json(result, plan, machine, gpus, elapsed), indent=1))
    else:
        print(report.table(result, plan, machine, gpus, elapsed))
    if args.explain:
        chosen = (result.ranked or result.unfit or [None])[0]
        if chosen is not None:
            print(report.explain(chosen, plan, machine, args.explain), file=sys.stderr
                  if args.format == "json" else sys.stdout)  # fmt: skip
    return 0 if result.ranked else 1


def _run_profile(args) -> int:
    from mpi4py import MPI

    from hpcpipe.plan.profile import run_profile

    comm = MPI.COMM_WORLD
    try:
        config = load_plan_config(args)
    except ValueError as exc:
        if comm.Get_rank() == 0:
            print(f"hpcpipe plan --profile: {exc}", file=sys.stderr)
        return 2
    run_profile(config, args.profile, comm)
    return 0
