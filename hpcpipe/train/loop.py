"""The training loop: build this rank's trainer, resume, step, log, checkpoint."""

from __future__ import annotations

import functools
import json
import time

import torch
from mpi4py import MPI

from hpcpipe.checkpoint import store as checkpoint
from hpcpipe.checkpoint.format import CheckpointError, CheckpointMismatch
from hpcpipe.config import Config
from hpcpipe.parallel.grid import Grid, Topology
from hpcpipe.parallel.p2p import allreduce_, wait_politely
from hpcpipe.pipeline import trace as tracing
from hpcpipe.pipeline.autoschedule import AUTO
from hpcpipe.pipeline.schedule import build_schedule
from hpcpipe.pipeline.simulate import fit_costs
from hpcpipe.plan import devices, flops
from hpcpipe.train import evaluate as evaluation
from hpcpipe.train import fault, logs, memory, recovery
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
    tensorboard: str | None = None,
) -> list[dict]:
    """Train until config.train.steps; rank 0 prints and writes metrics.

    With trace_path, the last step is traced (every action's start and end on every rank).
    resume: None, "auto" (the newest committed checkpoint in checkpoint.dir that every rank
    loads; step 0 on fresh weights when none does) or a checkpoint path (must load).
    init_from: an hpcpipe checkpoint or Hugging Face folder whose weights start the run (step
    0) when resume finds no checkpoint; config.model must be the one it describes (see
    hpcpipe.train.init_from.load_config).
    tensorboard: a folder where rank 0 writes TensorBoard event files (every number of
    each step's metrics record; hpcpipe.train.logs).
    Raises fault.Stopped after checkpointing when a rank received SIGTERM or SIGUSR1.
    """
    config, active = recovery.elastic_layout(config, comm, echo)
    if active is None:
        recovery.idle_until_done(comm)  # an idle rank of a re-planned layout
        return []
    stop = fault.StopRequest().install()
    try:
        run = functools.partial(train_on, tensorboard=tensorboard)
        records = recovery.train_recovering(
            run, active, config, metrics_path, echo, trace_path, resume, stop, init_from
        )
    finally:
        stop.restore()
    if active is not comm:
        recovery.idle_until_done(comm)
    return records


def timed_step(trainer: PipelineTrainer) -> tuple[dict, list[dict] | None]:
    """Run one step with every action timed: its record, and on world rank 0 the events of
    every pipeline rank (of the first data-parallel replica)."""
    comm = trainer.grid.cart
    comm.Barrier()  # a common origin for every rank's clock
    origin = time.perf_counter()
    trainer.runtime.trace = []
    record = trainer.train_step()
    events = tracing.local_events(trainer.runtime.trace, origin, trainer.grid.pp_rank)
    trainer.runtime.trace = None
    gathered = comm.gather(events if trainer.grid.coords["dp"] == 0 else [], root=0)
    merged = [e for part in gathered for e in part] if trainer.grid.world_rank == 0 else None
    return record, merged


def trace_step(trainer: PipelineTrainer, path: str) -> dict:
    """Run one step with every action timed; rank 0 writes the merged trace. Returns the record."""
    record, events = timed_step(trainer)
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
        meta = tracing.write_trace(path, events, meta)
        record["measured_bubble"] = meta["measured_bubble"]
    return record


def fits_zb_auto(config) -> bool:
    """zb-auto without given costs: its first step here is timed and the schedule rebuilt."""
    s = config.schedule
    return s.name == AUTO and not s.costs and not s.csv and config.parallel.pp > 1


def fitted_step(trainer: PipelineTrainer, say) -> dict:
    """One timed step; then zb-auto rebuilt for the T_F, T_B, T_W and T_comm it measured (rank
    0 fits them, every rank builds the same schedule from them)."""
    record, events = timed_step(trainer)
    costs = fit_costs(tracing.compute_timeline(events), V=1) if events is not None else None
    costs = trainer.grid.cart.bcast(costs, root=0)
    s, pp = trainer.config.schedule, trainer.config.parallel.pp
    schedule = build_schedule(AUTO, pp, s.microbatches, costs=costs, memory_limit=s.memory_limit)
    trainer.use_schedule(schedule)
    say(f"hpcpipe: zb-auto rebuilt for the costs step {record['step']} measured: T_F "
        f"{costs.t_f * 1e3:.2f} ms, T_B {costs.t_b * 1e3:.2f} ms, T_W {costs.t_w * 1e3:.2f} "
        f"ms, T_comm {costs.t_comm * 1e3:.3f} ms (set schedule.costs to fix them)")  # fmt: skip
    return record


def _polite(comm, timeout: float, what: str) -> None:
    """A barrier that sleeps while it waits and gives up after `timeout` (a dead rank)."""
    wait_politely(
        comm.Ibarrier(),
        time.monotonic() + timeout,
        lambda: f"resume: not every rank reached '{what}' within {timeout:.0f} s",
    )


def resume_candidates(config: Config, comm, resume: str | None) -> list[str]:
    """The checkpoints to try, newest first: [PATH] for --resume PATH; for `auto` every
    committed step of checkpoint.dir, listed by rank 0 (no shard is read) and broadcast, so
    every rank tries the same ones even where a shared file system shows them late."""
    if not resume:
        return []
    if resume != "auto":
        return [resume]
    listed = None
    if comm.Get_rank() == 0:
        try:
            listed = [str(p) for _, p in checkpoint.committed_steps(config.checkpoint.dir)]
        except OSError as exc:  # reported on every rank, not only here
            listed = f"{type(exc).__name__}: {exc}"
    _polite(comm, config.parallel.timeout, "checkpoint list")
    listed = comm.bcast(listed, root=0)
    if isinstance(listed, str):
        raise CheckpointError(f"cannot list the checkpoints in {config.checkpoint.dir}: {listed}")
    return listed


def _short(error: str, limit: int = 400) -> str:
    return error if len(error) <= limit else error[: limit - 3] + "..."


def restore_agreed(trainer: PipelineTrainer, path: str) -> tuple[dict | None, str | None]:
    """Collective: every rank restores `path` (checking each piece it reads), then one
    MIN-reduction of an ok flag decides for all: (manifest, None) when every rank loaded it,
    else (None, "rank R: error; ...") on every rank. A failed load may have written some
    parameters and optimizer state in place: restore again, or build a fresh trainer.
    NOTE: the restore must not communicate (derive=False): a rank that fails early would
    miss it; the parameters are derived from the masters after the verdict.
    """
    comm, timeout = trainer.grid.cart, trainer.config.parallel.timeout
    meta, error, mismatch = None, None, False
    try:
        meta = train_state.restore(trainer, path, derive=False)
    except MPI.Exception:
        raise  # a process failure: the ULFM recovery's (train_recovering) to handle
    except Exception as exc:  # noqa: BLE001 - any failure to load steps back, on every rank
        error = _short(f"{type(exc).__name__}: {exc}")
        mismatch = isinstance(exc, CheckpointMismatch)
    # 1: loaded; 0: unreadable or corrupt here; -1: a sound checkpoint of another model
    ok = torch.tensor([-1 if mismatch else 0 if error else 1], dtype=torch.int32)
    allreduce_(comm, ok, op=MPI.MIN, timeout=timeout)
    if int(ok.item()) == -1:
        raise CheckpointMismatch(
            f"checkpoint {path} does not fit this run's model: {error or 'on another rank'}; "
            "refusing to start over at step 0 (its later saves would prune this one). Resume "
            "with the config it was saved with (its manifest.json holds it) or set "
            "checkpoint.dir to a new folder"
        )
    if int(ok.item()) == 1:
        train_state.derive_params(trainer)  # collective: only once every rank has loaded
        return meta, None
    _polite(comm, timeout, "restore verdict")  # only on the failure path
    errors = comm.allgather(error)
    by_error: dict[str, list[int]] = {}
    for rank, e in enumerate(errors):
        if e:
            by_error.setdefault(e, []).append(rank)
    return None, "; ".join(
        f"rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))}: {e}"
        for e, r in by_error.items()
    )


def resume_newest(trainer: PipelineTrainer, candidates: list[str], say):
    """(path, manifest) of the first candidate every rank restores, or (None, None).

    Warns once (rank 0) about each candidate skipped: which ranks failed and why.
    """
    rng = torch.get_rng_state()  # a skipped restore may have set it on the ranks that loaded
    for path in candidates:
        meta, failed = restore_agreed(trainer, path)
        if meta is not None:
            return path, meta
        torch.set_rng_state(rng)
        say(f"hpcpipe: warning: skipping checkpoint {path}: {failed}")
    return None, None


def train_on(
    comm,
    config,
    metrics_path,
    echo,
    trace_path,
    resume,
    stop,
    holder=None,
    init_from=None,
    tensorboard=None,
):
    """Build this rank's trainer on `comm`, resume (or init from weights) if asked, and run.

    holder["grid"] is set so a failure handler can revoke the communicators in use.
    `--resume auto` tries the committed checkpoints newest first (every rank checks what it
    loads; the ranks agree after each one); when none loads, the run starts at step 0 on a
    freshly built trainer. An explicit --resume PATH that fails raises on every rank.
    """
    blueprint = make_blueprint(config, comm.Get_size())
    torch.set_num_threads(config.train.threads)
    p = config.parallel
    grid = Grid(comm, Topology.parse(p.dp, p.pp, p.tp, p.order))
    if holder is not None:
        holder["grid"] = grid
    device = pick_device(config, comm)
    fresh_rng = torch.get_rng_state()

    def build() -> PipelineTrainer:  # collective (the tied groups' communicators)
        built = PipelineTrainer(config, grid, blueprint, device=device)
        built.stop_request = stop
        return built

    trainer = build()
    leader = grid.world_rank == 0
    say = echo if leader else (lambda _: None)
    say(describe_run(config, blueprint, comm.Get_size()))
    say_predicted_memory(trainer, say)
    candidates = resume_candidates(config, grid.cart, resume)
    start, meta = None, None
    if resume and resume != "auto":
        meta, failed = restore_agreed(trainer, resume)
        if meta is None:
            raise CheckpointError(f"cannot resume from {resume}: {failed}")
        start = resume
    elif candidates:
        start, meta = resume_newest(trainer, candidates, say)
        if start is None:
            # NOTE: the failed loads wrote some parameters and moments in place: rebuild.
            trainer = None
            torch.set_rng_state(fresh_rng)
            trainer = build()
            say(f"hpcpipe: warning: none of the {len(candidates)} checkpoint(s) in "
                f"{config.checkpoint.dir} could be restored; starting at step 0 with freshly "
                "initialised weights")  # fmt: skip
    elif resume:
        say(f"hpcpipe: no checkpoint in {config.checkpoint.dir}; starting at step 0")
    if start:
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
    board = None
    if leader and tensorboard:
        board = logs.TensorBoardLog(tensorboard, trainer.step_index + 1 if start else None)
    try:
        records = step_loop(trainer, sink, say, trace_path, board)
    finally:
        if sink:
            sink.close()
        if board:
            board.close()
    grid.free()  # NOTE: not after a failure: the recovery revokes these communicators first
    return records


def step_loop(trainer: PipelineTrainer, sink, say, trace_path, board=None) -> list[dict]:
    """Steps until the end, an exit interval, or a stop signal (then checkpoint and raise).

    sink: the metrics file (JSON lines) or None; board: a logs.TensorBoardLog or None.
    """
    config, records = trainer.config, []
    eta = logs.Eta(config.train.steps)
    step_flops, peak = model_flops_and_peak(trainer)
    world = trainer.grid.cart.Get_size()
    fitting = fits_zb_auto(config)
    while trainer.step_index < config.train.steps:
        last = trainer.step_index == config.train.steps - 1
        if trace_path and last:
            record = trace_step(trainer, trace_path)
        elif fitting:
            record, fitting = fitted_step(trainer, say), False
        else:
            record = trainer.train_step()
        record.update(flops.rank_throughput(step_flops, record["step_time"], world, peak))
        if evaluation.due(record["step"], config, last):  # collective: every rank evaluates
            record.update(evaluation.metrics(trainer.evaluate()))
        records.append(record)
        left = eta.update(record["step"], record["step_time"])
        if record["step"] % config.train.log_every == 0:
            say(format_record(record, config.train.steps, left))
        if sink:
            sink.write(json.dumps(record) + "\n")
            sink.flush()
        if board:
            board.write(record)
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


def model_flops_and_peak(trainer: PipelineTrainer) -> tuple[float | None, float | None]:
    """Model FLOPs of one step (None when the family has no layer_flops) and the peak TFLOP/s
    of one rank's device: train.peak_tflops, else the known peak (None on CPU, unknown GPUs)."""
    spec, config = trainer.blueprint.spec, trainer.config
    step_flops = None
    if spec.layer_flops is not None:
        step_flops = flops.model_flops_per_step(spec, config.model, config.train.global_batch)
    peak = config.train.peak_tflops or devices.known_peak_tflops(trainer.device, config.train.dtype)
    return step_flops, peak


def maybe_save(trainer: PipelineTrainer, last: bool, say, force: bool = False) -> None:
    """Checkpoint every checkpoint.every steps, after the last if checkpoint.at_end, or now."""
    c = trainer.config.checkpoint
    periodic = c.every and trainer.step_index % c.every == 0
    if force or periodic or (last and c.at_end):
        path = train_state.save(trainer, c.dir)
        say(f"hpcpipe: checkpoint {path}")


def say_predicted_memory(trainer: PipelineTrainer, say) -> None:
    """Rank 0 prints each pipeline rank's predicted memory (collective over the grid)."""
    g = trainer.grid
    mine = None
    if g.dp_rank == 0 and g.tp_rank == 0:  # one rank per pipeline stage predicts its own
        mine = {k: v for k, v in trainer.predicted_memory().items() if k != "per_microbatch"}
    gathered = g.cart.gather(mine, root=0)
    if g.world_rank == 0:
        say(memory.describe(sorted((p for p in gathered if p), key=lambda p: p["pp_rank"])))


def format_record(record: dict, steps: int, eta: float | None = None) -> str:
    """One progress line; eta: seconds left (logs.Eta), shown when given."""
    norm = record["grad_norm"]
    norm = "skipped (overflow)" if norm is None else f"{norm:.3f}"
    scale = f" | loss scale {record['loss_scale']:g}" if "loss_scale" in record else ""
    val = (f" | val_loss {record['val_loss']:.4f} (ppl {record['val_ppl']:.2f})"
           if "val_loss" in record else "")  # fmt: skip
    left = f" | eta {logs.format_duration(eta)}" if eta is not None else ""
    return (
        f"step {record['step']:>5}/{steps} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
        f"grad_norm {norm} | {record['tokens_per_s']:,.0f} tok/s{format_flops(record)} | "
        f"bubble {record['bubble']:.3f} | step_time {logs.format_seconds(record['step_time'])}"
        f"{val}{scale}{left}"
    )


def format_flops(record: dict) -> str:
    """The progress line's throughput, "| 1.23 TFLOP/s/rank | mfu 41.2%", each part if known."""
    rate, mfu = record.get("tflops_per_rank"), record.get("mfu")
    text = f" | {rate:.3g} TFLOP/s/rank" if rate is not None else ""
    return text + (f" | mfu {mfu:.1%}" if mfu is not None else "")
