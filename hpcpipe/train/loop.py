"""The training loop: build this rank's trainer, resume, step, log, checkpoint."""

from __future__ import annotations

import json
import time
import warnings

import torch

from hpcpipe.checkpoint import store as checkpoint
from hpcpipe.config import Config
from hpcpipe.parallel.grid import Grid, Topology
from hpcpipe.pipeline import trace as tracing
from hpcpipe.train import fault, recovery
from hpcpipe.train import state as train_state
from hpcpipe.train.trainer import PipelineTrainer, describe_run, make_blueprint, pick_device


def train(
    config: Config,
    comm,
    metrics_path: str | None = None,
    echo=print,
    trace_path: str | None = None,
    resume: str | None = None,
    init_from: str | None = None,
) -> list[dict]:
    """Train until config.train.steps; rank 0 prints and writes metrics.

    With trace_path, the last step is traced (every action's start and end on every rank).
    resume: None, "auto" (newest valid checkpoint in checkpoint.dir) or a checkpoint path.
    init_from: an hpcpipe checkpoint or Hugging Face folder whose weights start the run (step
    0) when resume finds no checkpoint; config.model must be the one it describes (see
    hpcpipe.train.init_from.load_config).
    Raises fault.Stopped after checkpointing when a rank received SIGTERM or SIGUSR1.
    """
    config, active = recovery.elastic_layout(config, comm, echo)
    if active is None:
        recovery.idle_until_done(comm)  # an idle rank of a re-planned layout
        return []
    stop = fault.StopRequest().install()
    try:
        records = recovery.train_recovering(
            train_on, active, config, metrics_path, echo, trace_path, resume, stop, init_from
        )
    finally:
        stop.restore()
    if active is not comm:
        recovery.idle_until_done(comm)
    return records


def trace_step(trainer: PipelineTrainer, path: str) -> dict:
    """Run one step with every action timed; rank 0 writes the merged trace. Returns the record."""
    comm = trainer.grid.cart
    comm.Barrier()  # a common origin for every rank's clock
    origin = time.perf_counter()
    trainer.runtime.trace = []
    record = trainer.train_step()
    events = tracing.local_events(trainer.runtime.trace, origin, trainer.grid.pp_rank)
    trainer.runtime.trace = None
    gathered = comm.gather(events if trainer.grid.coords["dp"] == 0 else [], root=0)
    if trainer.grid.world_rank == 0:
        s = trainer.config.schedule
        meta = {
            "K": trainer.config.parallel.pp,
            "M": s.microbatches,
            "V": s.virtual,
            "schedule": s.name,
            "step": record["step"],
            "step_time": record["step_time"],
        }
        meta = tracing.write_trace(path, [e for part in gathered for e in part], meta)
        record["measured_bubble"] = meta["measured_bubble"]
    return record


def resume_point(config: Config, comm, resume: str | None, echo) -> str | None:
    """The checkpoint to start from: --resume PATH, or the newest valid one for `auto`."""
    if not resume:
        return None
    if resume != "auto":
        return resume
    found = None
    if comm.Get_rank() == 0:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            found = checkpoint.find_latest_valid(config.checkpoint.dir)
        for warning in caught:
            echo(f"hpcpipe: warning: {warning.message}")
        if found is None:
            echo(f"hpcpipe: no valid checkpoint in {config.checkpoint.dir}; starting at step 0")
    found = comm.bcast(str(found) if found else None, root=0)
    return found


def train_on(
    comm, config, metrics_path, echo, trace_path, resume, stop, holder=None, init_from=None
):
    """Build this rank's trainer on `comm`, resume (or init from weights) if asked, and run.

    holder["grid"] is set so a failure handler can revoke the communicators in use.
    """
    blueprint = make_blueprint(config, comm.Get_size())
    torch.set_num_threads(config.train.threads)
    p = config.parallel
    grid = Grid(comm, Topology.parse(p.dp, p.pp, p.tp, p.order))
    if holder is not None:
        holder["grid"] = grid
    trainer = PipelineTrainer(config, grid, blueprint, device=pick_device(config, comm))
    trainer.stop_request = stop
    leader = grid.world_rank == 0
    say = echo if leader else (lambda _: None)
    say(describe_run(config, blueprint, comm.Get_size()))
    start = resume_point(config, comm, resume, say)
    if start:
        meta = train_state.restore(trainer, start)
        changed = train_state.check_layout_change(meta, config)
        moved = f" onto a new layout ({', '.join(changed)})" if changed else ""
        since = holder.pop("failed_at", None) if holder else None
        took = f" ({time.perf_counter() - since:.2f} s after the failure)" if since else ""
        say(f"hpcpipe: resumed from {start} at step {trainer.step_index}{moved}{took}")
    elif init_from:
        from hpcpipe.train.init_from import load_into

        count = load_into(trainer, init_from)
        say(f"hpcpipe: initialised from {init_from} ({count} tensors)")
    sink = open(metrics_path, "a" if start else "w") if leader and metrics_path else None  # noqa: SIM115
    try:
        records = step_loop(trainer, sink, say, trace_path)
    finally:
        if sink:
            sink.close()
    grid.free()  # NOTE: not after a failure: the recovery revokes these communicators first
    return records


def step_loop(trainer: PipelineTrainer, sink, say, trace_path) -> list[dict]:
    """Steps until the end, an exit interval, or a stop signal (then checkpoint and raise)."""
    config, records = trainer.config, []
    while trainer.step_index < config.train.steps:
        last = trainer.step_index == config.train.steps - 1
        record = trace_step(trainer, trace_path) if trace_path and last else trainer.train_step()
        records.append(record)
        if record["step"] % config.train.log_every == 0:
            say(format_record(record, config.train.steps))
        if sink:
            sink.write(json.dumps(record) + "\n")
            sink.flush()
        interval = config.train.exit_interval
        exiting = bool(interval) and trainer.step_index % interval == 0 and not last
        signalled = record.get("stop_requested", False) and not last
        maybe_save(trainer, last, say, force=exiting or signalled)
        if signalled:
            say(f"hpcpipe: stop signal: checkpointed step {trainer.step_index}; exiting with "
                f"{fault.EXIT_REQUEUE} (resubmit with --resume auto)")  # fmt: skip
            raise fault.Stopped(trainer.step_index)
        if exiting:
            say(f"hpcpipe: exit_interval reached at step {trainer.step_index}")
            break
    return records


def maybe_save(trainer: PipelineTrainer, last: bool, say, force: bool = False) -> None:
    """Checkpoint every checkpoint.every steps, after the last if checkpoint.at_end, or now."""
    c = trainer.config.checkpoint
    periodic = c.every and trainer.step_index % c.every == 0
    if force or periodic or (last and c.at_end):
        path = train_state.save(trainer, c.dir)
        say(f"hpcpipe: checkpoint {path}")


def format_record(record: dict, steps: int) -> str:
    """One progress line."""
    return (
        f"step {record['step']:>5}/{steps} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
        f"grad_norm {record['grad_norm']:.3f} | {record['tokens_per_s']:,.0f} tok/s | "
        f"bubble {record['bubble']:.3f}"
    )
