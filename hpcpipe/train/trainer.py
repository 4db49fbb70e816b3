"""One rank's share of training: its stages, schedule, runtime, reductions and optimizer."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from hpcpipe import data
from hpcpipe.config import Config, ConfigError, check_world
from hpcpipe.models import get_spec
from hpcpipe.models.api import ModelSpec, build_stage, check_boundaries, layer_costs
from hpcpipe.parallel import tied
from hpcpipe.parallel.data_parallel import GradReducer
from hpcpipe.parallel.grid import Grid
from hpcpipe.parallel.p2p import P2P, allreduce_
from hpcpipe.parallel.tensor_parallel import TPContext, parallelize_stage, require_plan
from hpcpipe.pipeline.partition import Partition, PartitionError, partition_layers
from hpcpipe.pipeline.runtime import PipelineRuntime, StepResult
from hpcpipe.pipeline.schedule import SPLIT_BACKWARD, Schedule, ScheduleError, build_schedule
from hpcpipe.pipeline.zero_bubble import WeightGradStore, enable_split_backward
from hpcpipe.train import fault, optim

TORCH_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass(frozen=True)
class Blueprint:
    """Everything decided from the config alone: identical on every rank, no MPI needed."""

    spec: ModelSpec  # the model family
    model: object  # its config (config.model)
    partition: Partition
    schedule: Schedule
    num_stages: int
    microbatch_size: int


def make_blueprint(config: Config, world_size: int) -> Blueprint:
    """Check the config against the world; derive partition and schedule (raises ConfigError)."""
    check_world(config, world_size)
    p, s = config.parallel, config.schedule
    spec, model = get_spec(config.model.arch), config.model
    per_replica = config.train.global_batch // p.dp
    microbatch_size = per_replica // s.microbatches
    num_stages = p.pp * s.virtual
    try:
        check_tensor_parallel(spec, model, p.tp)
        check_boundaries(spec, model, microbatch_size)
        costs = layer_costs(spec, model, p.balance)
        schedule = build_schedule(s.name, p.pp, s.microbatches, s.virtual)
        partition = partition_layers(costs, num_stages, counts=p.partition or None)
    except (PartitionError, ScheduleError) as exc:
        detail = f" (pp={p.pp} x schedule.virtual={s.virtual} stages)" if s.virtual > 1 else ""
        raise ConfigError(f"{exc}{detail}") from None
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if config.data.path and not Path(config.data.path).is_file():
        raise ConfigError(
            f"data.path={config.data.path} does not exist; create it with "
            f"`hpcpipe data prepare --out {config.data.path} TEXT...` or leave data.path empty "
            "for the built-in corpus"
        )
    return Blueprint(spec, model, partition, schedule, num_stages, microbatch_size)


def check_tensor_parallel(spec: ModelSpec, model, tp: int) -> None:
    """The family must have a tensor-parallel plan that splits this model tp ways."""
    if tp == 1:
        return
    require_plan(spec).check(model, tp)


class PipelineTrainer:
    """One rank's share of pipeline-parallel training."""

    def __init__(
        self, config: Config, grid: Grid, blueprint: Blueprint, device: str = "cpu", tokens=None
    ):
        self.config, self.grid, self.blueprint = config, grid, blueprint
        self.dtype = TORCH_DTYPES[config.train.dtype]
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
        self.tied = tied.build_groups(
            blueprint.spec.tie_groups(blueprint.model), self.stages,
            blueprint.partition.stage_of_layer, grid,
        )  # fmt: skip
        self.canonical = tied.canonical_names(self.tied)  # tied copy -> the name it is stored as
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
        self.runtime = PipelineRuntime(
            stages=self.stages,
            actions=blueprint.schedule[self.pp_rank],
            num_stages=blueprint.num_stages,
            pp_size=config.parallel.pp,
            p2p=P2P(grid.pp_comm, timeout=config.parallel.timeout),
            activation_shape=blueprint.spec.boundary_shape(
                blueprint.model, blueprint.microbatch_size
            ),
            dtype=self.dtype,
            device=self.device,
            loss_fn=self._loss_fn(),
            recompute=config.schedule.recompute,
            fail_at=self._fail_at(),
            weight_store=self.weight_store,
            fault_injection=fault.injection_from_env(),
            world_rank=launch_rank(),
        )
        self.stop_request: fault.StopRequest | None = None

    def _norm_params(self, named) -> list[torch.nn.Parameter]:
        """The parameters whose squares this rank adds to the global norm: each counted once.

        dp replicas hold equal gradients (dp rank 0 counts); replicated tensor-parallel
        parameters are equal on every tp rank (tp rank 0 counts); a tied copy duplicates its
        group's first member (that one counts).
        """
        if self.grid.dp_rank > 0:
            return []
        skip = tied.duplicate_copies(self.tied, self.stages)
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

    def _loss_fn(self):
        """The family's loss, or its vocabulary-parallel form under tensor parallelism."""
        b = self.blueprint
        return b.spec.tp_plan().loss(b.model, self.tp) if self.tp.size > 1 else b.spec.loss

    def _build_stages(self) -> dict:
        """The chunks this pipeline rank holds, built directly from the seed (no full model)."""
        b, stages = self.blueprint, {}
        for s in range(self.pp_rank, b.num_stages, self.config.parallel.pp):
            stage = build_stage(b.spec, b.model, b.partition.layers(s), self.config.train.seed)
            if self.tp.size > 1:
                self.tp_specs.update(parallelize_stage(stage, b.spec, b.model, self.tp))
            stages[s] = stage.to(device=self.device, dtype=self.dtype)
        return stages

    def _needs_data(self) -> bool:
        return 0 in self.stages or self.blueprint.num_stages - 1 in self.stages

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
        for group in self.tied:
            result.wait_seconds += tied.sum_tied_grads(group, self.config.parallel.timeout)
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


def describe_run(config: Config, blueprint: Blueprint, world_size: int) -> str:
    """The banner rank 0 prints before training."""
    p, s = config.parallel, config.schedule
    lines = [
        f"hpcpipe: {config.model.arch} model, {world_size} ranks "
        f"(dp={p.dp} pp={p.pp} tp={p.tp}), schedule {s.name}, "
        f"M={s.microbatches} micro-batches of {blueprint.microbatch_size}"
        f"{f', V={s.virtual} chunks per rank' if s.virtual > 1 else ''}, dtype {config.train.dtype}"
        f"{', recompute' if s.recompute else ''}",
        blueprint.partition.describe(),
    ]
    return "\n".join(lines)
