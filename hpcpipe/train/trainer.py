"""Pipeline-parallel training loop: grid + partition + schedule + runtime + optimizer."""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from mpi4py import MPI

from hpcpipe import data
from hpcpipe.checkpoint import store as checkpoint
from hpcpipe.config import Config, ConfigError, check_world
from hpcpipe.models.gpt2.model import GPTConfig, Stage, loss_fn
from hpcpipe.parallel import tied, ulfm
from hpcpipe.parallel.data_parallel import GradReducer
from hpcpipe.parallel.grid import Grid, Topology
from hpcpipe.parallel.p2p import P2P, allreduce_
from hpcpipe.parallel.tensor_parallel import TPContext, check_divisible, loss_for, parallelize_stage
from hpcpipe.pipeline import trace as tracing
from hpcpipe.pipeline.partition import Partition, PartitionError, plan
from hpcpipe.pipeline.runtime import PipelineRuntime, StepResult
from hpcpipe.pipeline.schedule import SPLIT_BACKWARD, Schedule, ScheduleError, build_schedule
from hpcpipe.pipeline.zero_bubble import WeightGradStore, enable_split_backward
from hpcpipe.train import elastic, fault, optim
from hpcpipe.train import state as train_state

TORCH_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def gpt_config(config: Config) -> GPTConfig:
    """The model section as the model's own config."""
    m = config.model
    return GPTConfig(
        n_layers=m.n_layers,
        d_model=m.d_model,
        n_heads=m.n_heads,
        seq_len=m.seq_len,
        vocab_size=m.vocab_size,
        tie_embeddings=m.tie_embeddings,
    )


@dataclass(frozen=True)
class Plan:
    """Everything decided from the config alone: identical on every rank, no MPI needed."""

    model: GPTConfig
    partition: Partition
    schedule: Schedule
    num_stages: int
    microbatch_size: int


def make_plan(config: Config, world_size: int) -> Plan:
    """Check the config against the world and derive partition and schedule (raises ConfigError)."""
    check_world(config, world_size)
    p, s = config.parallel, config.schedule
    model = gpt_config(config)
    try:
        model.check()
        check_divisible(model, p.tp)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    num_stages = p.pp * s.virtual
    try:
        schedule = build_schedule(s.name, p.pp, s.microbatches, s.virtual)
        partition = plan(model, num_stages, counts=p.partition or None, cost=p.balance)
    except (PartitionError, ScheduleError) as exc:
        detail = f" (pp={p.pp} x schedule.virtual={s.virtual} stages)" if s.virtual > 1 else ""
        raise ConfigError(f"{exc}{detail}") from None
    if config.data.path and not Path(config.data.path).is_file():
        raise ConfigError(
            f"data.path={config.data.path} does not exist; create it with "
            f"`hpcpipe data prepare --out {config.data.path} TEXT...` or leave data.path empty "
            "for the built-in corpus"
        )
    per_replica = config.train.global_batch // p.dp
    return Plan(model, partition, schedule, num_stages, per_replica // s.microbatches)


class PipelineTrainer:
    """One rank's share of pipeline-parallel training."""

    def __init__(self, config: Config, grid: Grid, plan: Plan, device: str = "cpu", tokens=None):
        self.config, self.grid, self.plan = config, grid, plan
        self.dtype = TORCH_DTYPES[config.train.dtype]
        self.tie = plan.model.tie_embeddings
        self.device = torch.device(device)
        self.pp_rank = grid.pp_rank
        self.tp = TPContext(grid.tp_comm, grid.tp_rank, config.parallel.tp, config.parallel.timeout)
        self.tp_specs: dict[str, tuple] = {}  # global name -> (dim, offset, global size)
        self.stages = self._build_stages()
        self.weight_store = None
        if config.schedule.name in SPLIT_BACKWARD:
            self.weight_store = WeightGradStore()
            for stage in self.stages.values():
                enable_split_backward(stage, self.weight_store)
        named = unique_named_parameters(self.stages)
        self.named_params = named
        self.params = [p for _, p in named]
        self.tied = tied.tied_copies(self.stages, plan.model.num_layers) if self.tie else []
        self.norm_params = self._norm_params(named)
        self.optimizer = optim.make_adamw(named, config.train)
        self.reducer = GradReducer(
            self.params, grid.dp_comm, config.schedule.microbatches,
            timeout=config.parallel.timeout,
        )  # fmt: skip
        if self.weight_store is not None:
            self.weight_store.on_accumulate = self.reducer.grad_ready
            self.reducer.defer(deferred_parameters(self.stages))
        self.step_index = 0
        self.sampler, self.tokens = self._build_data(tokens)
        m = config.model
        self.runtime = PipelineRuntime(
            stages=self.stages,
            actions=plan.schedule[self.pp_rank],
            num_stages=plan.num_stages,
            pp_size=config.parallel.pp,
            p2p=P2P(grid.pp_comm, timeout=config.parallel.timeout),
            activation_shape=(plan.microbatch_size, m.seq_len, m.d_model),
            dtype=self.dtype,
            device=self.device,
            loss_fn=loss_for(plan.model, self.tp) if self.tp.size > 1 else loss_fn,
            recompute=config.schedule.recompute,
            fail_at=self._fail_at(),
            weight_store=self.weight_store,
            fault_plan=fault.plan_from_env(),
            world_rank=launch_rank(),
        )
        self.stop_request: fault.StopRequest | None = None

    def _norm_params(self, named) -> list[torch.nn.Parameter]:
        """The parameters whose squares this rank adds to the global norm: each counted once.

        dp replicas hold equal gradients (dp rank 0 counts); replicated tensor-parallel
        parameters are equal on every tp rank (tp rank 0 counts); the head's copy of a tied
        matrix duplicates the embedding's (the embedding counts).
        """
        if self.grid.dp_rank > 0:
            return []
        skip = (
            tied.separate_head_copy(self.stages, self.plan.model.num_layers) if self.tie else set()
        )
        keep = []
        for name, p in named:
            replicated = name not in self.tp_specs
            if id(p) in skip or (replicated and self.grid.tp_rank > 0):
                continue
            keep.append(p)
        return keep

    def _fail_at(self) -> str | None:
        """This rank's part of debug.fail_at = "WORLD_RANK:STEP:ACTION"."""
        spec = self.config.debug.fail_at
        if not spec:
            return None
        rank, _, rest = spec.partition(":")
        return rest if int(rank) == self.grid.world_rank else None

    def _build_stages(self) -> dict[int, Stage]:
        """The chunks this pipeline rank holds, built directly from the seed (no full model)."""
        stages = {}
        for s in range(self.pp_rank, self.plan.num_stages, self.config.parallel.pp):
            stage = Stage(self.plan.model, self.plan.partition.layers(s), self.config.train.seed)
            if self.tp.size > 1:
                self.tp_specs.update(parallelize_stage(stage, self.plan.model, self.tp))
            stages[s] = stage.to(device=self.device, dtype=self.dtype)
        return stages

    def _needs_data(self) -> bool:
        return 0 in self.stages or self.plan.num_stages - 1 in self.stages

    def _build_data(self, tokens=None):
        """Tokens and sampler on the ranks holding the first or last stage (inputs / targets)."""
        if not self._needs_data():
            return None, None
        d, t = self.config.data, self.config.train
        if tokens is None:
            tokens = data.load_tokens(d.path or None, max_bytes=d.max_bytes)
        sampler = data.Sampler(len(tokens), self.config.model.seq_len, t.global_batch, t.seed)
        return sampler, tokens

    def next_microbatches(self) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
        """This step's micro-batches; ranks in the middle of the pipe get placeholders."""
        M = self.config.schedule.microbatches
        if self.sampler is None:
            return [(None, None)] * M
        starts = self.sampler.next_starts()
        share = len(starts) // self.config.parallel.dp  # this replica's slice of the batch
        starts = starts[self.grid.dp_rank * share : (self.grid.dp_rank + 1) * share]
        inputs, targets = data.make_batch(self.tokens, starts, self.config.model.seq_len)
        return data.split_microbatches(inputs, targets, M)

    def forward_backward(self) -> StepResult:
        """Run the schedule once: gradients of this step are accumulated in .grad."""
        for p in self.params:
            p.grad = None
        self.runtime.step_index = self.step_index
        self.reducer.start_step()
        result = self.runtime.step(self.next_microbatches())
        result.wait_seconds += self.reducer.finish()
        result.wait_seconds += tied.sum_tied_grads(
            self.tied, self.grid.embedding_comm, self.config.parallel.timeout
        )
        return result

    def finish_step(self, result: StepResult) -> dict:
        """Global norm, clipping, LR, AdamW; returns the step's loss, norm and lr."""
        t = self.config.train
        # The loss lives on the last stage, the same on every tp rank: tp rank 0 reports it.
        loss = result.loss if self.grid.tp_rank == 0 else 0.0
        totals = torch.tensor(
            [optim.grad_square_sum(self.norm_params), loss / self.config.parallel.dp],
            dtype=torch.float64,
        )
        waited = allreduce_(self.grid.cart, totals, timeout=self.config.parallel.timeout)
        grad_norm = float(totals[0]) ** 0.5
        optim.scale_grads(self.params, optim.clip_coefficient(grad_norm, t.grad_clip))
        lr = optim.lr_at(self.step_index, t)
        optim.set_lr(self.optimizer, lr)
        self.optimizer.step()
        self.step_index += 1
        return {"loss": float(totals[1]), "grad_norm": grad_norm, "lr": lr, "reduce_wait": waited}

    def train_step(self) -> dict:
        """One full optimizer step with its measurements (the same dict on every rank)."""
        start = time.perf_counter()
        result = self.forward_backward()
        record = self.finish_step(result)
        elapsed = time.perf_counter() - start
        waited = result.wait_seconds + record.pop("reduce_wait")
        stop = float(self.stop_request is not None and self.stop_request.signal is not None)
        stats = torch.tensor([waited, elapsed, result.peak_activations, stop], dtype=torch.float64)
        allreduce_(self.grid.cart, stats, timeout=self.config.parallel.timeout)
        world = self.grid.cart.Get_size()
        step_time = float(stats[1]) / world
        tokens = self.config.train.global_batch * self.config.model.seq_len
        record.update(
            step=self.step_index,
            tokens_per_s=tokens / step_time,
            bubble=float(stats[0]) / float(stats[1]),
            step_time=step_time,
            peak_activations=result.peak_activations,
        )
        if stats[3] > 0:
            record["stop_requested"] = True  # some rank got SIGTERM/SIGUSR1: all stop together
        return record


def pick_device(config: Config, comm) -> str:
    """cpu, or cuda:<node-local rank> so each rank on a node drives its own GPU."""
    wanted = config.train.device
    if wanted == "cpu" or (wanted == "auto" and not torch.cuda.is_available()):
        return "cpu"
    if not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but torch sees no CUDA device on this node")
    from mpi4py import MPI

    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    local_rank = node.Get_rank()
    node.Free()
    return f"cuda:{local_rank % torch.cuda.device_count()}"


def launch_rank() -> int:
    """This process's rank in the job as launched (stable across ULFM shrinks)."""
    from mpi4py import MPI

    return MPI.COMM_WORLD.Get_rank()


def deferred_parameters(stages: dict) -> list[torch.nn.Parameter]:
    """Parameters whose gradients a split backward computes in W (the Linear layers')."""
    return [
        p
        for stage in stages.values()
        for module in stage.modules()
        if getattr(module, "store", None) is not None
        for p in module.parameters(recurse=False)
    ]


def unique_named_parameters(stages: dict) -> list[tuple[str, torch.nn.Parameter]]:
    """(global name, parameter) of every local stage, each Parameter once, in stage order."""
    seen, out = set(), []
    for stage in stages.values():
        for name, param in stage.named_parameters():
            if id(param) not in seen:
                seen.add(id(param))
                out.append((name, param))
    return out


def describe_run(config: Config, plan: Plan, world_size: int) -> str:
    """The banner rank 0 prints before training."""
    p, s = config.parallel, config.schedule
    lines = [
        f"hpcpipe: {world_size} ranks (dp={p.dp} pp={p.pp} tp={p.tp}), schedule {s.name}, "
        f"M={s.microbatches} micro-batches of {plan.microbatch_size}"
        f"{f', V={s.virtual} chunks per rank' if s.virtual > 1 else ''}, dtype {config.train.dtype}"
        f"{', recompute' if s.recompute else ''}",
        plan.partition.describe(),
    ]
    return "\n".join(lines)


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


def train(
    config: Config,
    comm,
    metrics_path: str | None = None,
    echo=print,
    trace_path: str | None = None,
    resume: str | None = None,
) -> list[dict]:
    """Train until config.train.steps; rank 0 prints and writes metrics.

    With trace_path, the last step is traced (every action's start and end on every rank).
    resume: None, "auto" (newest valid checkpoint in checkpoint.dir) or a checkpoint path.
    Raises fault.Stopped after checkpointing when a rank received SIGTERM or SIGUSR1.
    """
    config, active = elastic_layout(config, comm, echo)
    if active is None:
        idle_until_done(comm)  # an idle rank of a re-planned layout
        return []
    stop = fault.StopRequest().install()
    try:
        records = train_recovering(active, config, metrics_path, echo, trace_path, resume, stop)
    finally:
        stop.restore()
    if active is not comm:
        idle_until_done(comm)
    return records


def _mpi_failure(exc: BaseException | None, held: list) -> bool:
    """A process failure in the exception's cause chain (ULFM): reported as one, or any other
    MPI error while a held communicator is revoked or knows a failed member."""
    seen, mpi_error = set(), False
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if ulfm.is_process_failure(exc):
            return True
        mpi_error = mpi_error or isinstance(exc, MPI.Exception)
        exc = exc.__cause__ or exc.__context__
    return mpi_error and ulfm.failure_known(held)


def _held_comms(comm, grid) -> list:
    """Every communicator a rank of this job may be waiting on."""
    return [comm] + ([grid.cart, grid.embedding_comm, *grid.comms.values()] if grid else [])


def train_recovering(comm, config, metrics_path, echo, trace_path, resume, stop) -> list[dict]:
    """train_on, and under ULFM: on a rank's death, shrink, re-plan, reload, carry on."""
    recoverable = ulfm.ulfm_available(comm)
    holder: dict = {}
    records: list[dict] = []
    while True:
        try:
            args = (metrics_path, echo, trace_path, resume, stop, holder)
            records += train_on(comm, config, *args)
            if holder.get("recovered"):
                exit_without_finalize(comm)
            return records
        except BaseException as exc:
            if not (recoverable and _mpi_failure(exc, _held_comms(comm, holder.get("grid")))):
                raise
            holder["failed_at"] = time.perf_counter()
            holder["recovered"] = True
            comm, config = recover(comm, config, holder.get("grid"), echo)
            resume = "auto"


def exit_without_finalize(comm) -> None:
    """End a process that survived a failure: every survivor is done, then exit(0).

    NOTE: after a rank died, Open MPI 5's MPI_Finalize on the survivors sometimes waits forever
    (seen 1 run in ~5 under load: all survivors sleeping in ompi_mpi_finalize). The work and its
    checkpoints are complete here, so meet the other survivors and leave without it.
    """
    from hpcpipe.parallel.p2p import wait_politely

    wait_politely(comm.Ibarrier(), time.monotonic() + 60, lambda: "survivors' final barrier")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def recover(comm, config: Config, grid, echo):
    """Revoke everything, shrink to the survivors, agree, re-plan the layout for them."""
    timeout = config.parallel.timeout
    ulfm.revoke_all(_held_comms(comm, grid))
    survivors, failed = ulfm.shrink(comm, timeout)
    if ulfm.agree(survivors, 1, timeout) != 1:
        raise RuntimeError("survivors could not agree to continue after a failure")
    size = survivors.Get_size()
    config, note = elastic.replan(config, size)
    p = config.parallel
    if survivors.Get_rank() == 0:
        echo(f"hpcpipe: ULFM: ranks {failed} failed; {size} survivors carry on in this job")
        if note:
            echo(f"hpcpipe: {note}")
    if p.dp * p.pp * p.tp != size:
        # NOTE: continuing on a sub-communicator would leave ranks idle; restart instead.
        raise RuntimeError(f"no layout uses exactly the {size} survivors; relaunch the job")
    return survivors, config


def idle_until_done(comm) -> None:
    """Meet the idle ranks at the end without spinning (MPI_Finalize would busy-wait)."""
    from hpcpipe.parallel.p2p import wait_politely

    # NOTE: an idle rank may wait for the whole run; only a dead job ends it (mpiexec).
    request = comm.Ibarrier()
    wait_politely(request, float("inf"), lambda: "unreachable")


def elastic_layout(config: Config, comm, echo):
    """(config, communicator to train on): re-planned for the ranks present when elastic.

    Ranks beyond the new layout get None and sit the run out.
    """
    world = comm.Get_size()
    if not config.parallel.elastic:
        return config, comm
    config, note = elastic.replan(config, world)
    if not note:
        return config, comm
    if comm.Get_rank() == 0:
        echo(f"hpcpipe: {note}")
    p = config.parallel
    used = p.dp * p.pp * p.tp
    if used == world:
        return config, comm
    from mpi4py import MPI

    color = 0 if comm.Get_rank() < used else MPI.UNDEFINED
    active = comm.Split(color, comm.Get_rank())
    return config, (None if active == MPI.COMM_NULL else active)


def train_on(comm, config, metrics_path, echo, trace_path, resume, stop, holder=None):
    """Build this rank's trainer on `comm`, resume if asked, and run the step loop.

    holder["grid"] is set so a failure handler can revoke the communicators in use.
    """
    plan = make_plan(config, comm.Get_size())
    torch.set_num_threads(config.train.threads)
    p = config.parallel
    grid = Grid(comm, Topology.parse(p.dp, p.pp, p.tp, p.order))
    if holder is not None:
        holder["grid"] = grid
    trainer = PipelineTrainer(config, grid, plan, device=pick_device(config, comm))
    trainer.stop_request = stop
    leader = grid.world_rank == 0
    say = echo if leader else (lambda _: None)
    say(describe_run(config, plan, comm.Get_size()))
    start = resume_point(config, comm, resume, say)
    if start:
        meta = train_state.restore(trainer, start)
        changed = train_state.check_layout_change(meta, config)
        moved = f" onto a new layout ({', '.join(changed)})" if changed else ""
        since = holder.pop("failed_at", None) if holder else None
        took = f" ({time.perf_counter() - since:.2f} s after the failure)" if since else ""
        say(f"hpcpipe: resumed from {start} at step {trainer.step_index}{moved}{took}")
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
