"""One rank's share of training: its stages, schedule, runtime, reductions and optimizer."""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from mpi4py import MPI

from hpcpipe import data, tokenizer
from hpcpipe.config import HALF, TORCH_DTYPES, Config, ConfigError, check_world
from hpcpipe.models import get_spec
from hpcpipe.models.api import (
    ModelSpec,
    build_stage,
    check_boundaries,
    enable_selective_recompute,
    layer_costs,
)
from hpcpipe.parallel import tied
from hpcpipe.parallel.data_parallel import GradReducer
from hpcpipe.parallel.grid import Grid
from hpcpipe.parallel.p2p import P2P, allreduce_
from hpcpipe.parallel.tensor_parallel import TPContext, parallelize_stage, require_plan
from hpcpipe.pipeline import twobw
from hpcpipe.pipeline.partition import Partition, PartitionError, partition_layers
from hpcpipe.pipeline.runtime import PipelineRuntime, StepResult
from hpcpipe.pipeline.schedule import (
    ASYNC_SCHEDULES,
    FORWARD_SCHEDULES,
    TRAINING_SCHEDULES,
    Placement,
    Schedule,
    ScheduleError,
    build_schedule,
    forward_only_schedule,
    load_csv_schedule,
    placement_of,
    stages_of,
    uses_split_backward,
)
from hpcpipe.pipeline.simulate import Costs
from hpcpipe.pipeline.zero_bubble import WeightGradStore, enable_split_backward
from hpcpipe.train import evaluate as evaluation
from hpcpipe.train import fault, memory, optim
from hpcpipe.train.precision import MasterOptimizer


def master_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the master weights (and of a stage as built): float32 for 16-bit runs."""
    return torch.float32 if dtype in HALF else dtype


@dataclass(frozen=True)
class Blueprint:
    """Everything decided from the config alone: identical on every rank, no MPI needed."""

    spec: ModelSpec  # the model family
    model: object  # its config (config.model)
    partition: Partition
    schedule: Schedule
    num_stages: int
    microbatch_size: int

    @property
    def placement(self) -> Placement:
        """Which pipeline rank holds each stage: where the schedule runs it (round robin, or
        the V shape of zb-v and of torch's ZBV/DualPipeV dumps)."""
        K = len(self.schedule)
        return placement_of(self.schedule, K, self.num_stages // K)

    def stages_on(self, pp_rank: int) -> list[int]:
        """The global stages one pipeline rank holds."""
        return stages_of(self.placement, pp_rank)


def make_blueprint(config: Config, world_size: int, data: bool = True) -> Blueprint:
    """Check the config against the world; derive partition and schedule (raises ConfigError).

    data=False skips the checks of config.data (for callers that bring their own tokens).
    """
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
        if s.name in FORWARD_SCHEDULES:
            raise ConfigError(
                f"schedule.name={s.name!r} has no backward: it is what evaluation runs "
                "(train.eval_every, hpcpipe eval); train with one of "
                + ", ".join(TRAINING_SCHEDULES)
            )
        if s.csv:
            schedule = load_csv_schedule(s.csv, p.pp, s.microbatches, s.virtual)
        else:
            timing = Costs.parse(s.costs) if s.costs else None  # zb-auto's
            schedule = build_schedule(
                s.name, p.pp, s.microbatches, s.virtual, costs=timing, memory_limit=s.memory_limit
            )
        partition = partition_layers(costs, num_stages, counts=p.partition or None)
    except (PartitionError, ScheduleError) as exc:
        detail = f" (pp={p.pp} x schedule.virtual={s.virtual} stages)" if s.virtual > 1 else ""
        raise ConfigError(f"{exc}{detail}") from None
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if data:
        check_data(config)
    return Blueprint(spec, model, partition, schedule, num_stages, microbatch_size)


def check_data(config: Config) -> None:
    """The token files exist and were tokenized with model.vocab_size (ConfigError)."""
    if config.data.path and not Path(config.data.path).is_file():
        raise ConfigError(
            f"data.path={config.data.path} does not exist; create it with "
            f"`hpcpipe data prepare --out {config.data.path} TEXT...` or leave data.path empty "
            "for the built-in corpus"
        )
    if config.data.val_path and not Path(config.data.val_path).is_file():
        raise ConfigError(
            f"data.val_path={config.data.val_path} does not exist; create it with "
            f"`hpcpipe data prepare --out {config.data.val_path} TEXT...` or leave it empty to "
            "hold out data.val_fraction of the training windows"
        )
    tokenizer.check_vocab(config.model.vocab_size, config.data.path or None)
    if config.data.val_path:
        tokenizer.check_vocab(config.model.vocab_size, config.data.val_path)


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
        if uses_split_backward(blueprint.schedule):
            self.weight_store = WeightGradStore()
            for stage in self.stages.values():
                enable_split_backward(stage, self.weight_store)
        named = unique_named_parameters(self.stages)
        self.named_params = named
        self.params = [p for _, p in named]
        self.tied = tied.build_groups(
            blueprint.spec.tie_groups(blueprint.model), self.stages,
            blueprint.partition.stage_of_layer, grid, blueprint.placement,
        )  # fmt: skip
        self.canonical = tied.canonical_names(self.tied)  # tied copy -> the name it is stored as
        self.norm_ids = self._norm_ids(named)
        self.reducer = GradReducer(
            self.params, grid.dp_comm, config.schedule.microbatches,
            timeout=config.parallel.timeout, zero=config.parallel.zero,
            isolate=[p for g in self.tied if tied.needs_sum(g) for p in g.copies],
        )  # fmt: skip
        # NOTE: built while the stages still hold full-precision values (the fp32 masters of a
        # 16-bit run start from them); it then stores the parameters in self.dtype.
        self.master = MasterOptimizer(named, self.reducer, config.train, self.dtype)
        self.optimizer = self.master.optimizer
        for stage in self.stages.values():
            stage.to(dtype=self.dtype)  # floating buffers, if a family has any
        # 2BW: the two weight versions the runtime runs (batch t on versions[t % 2], which
        # holds W(t-1)); self.stages are then the masters' home the optimizer updates.
        self.versions = self._build_versions() if self.asynchronous else None
        self._in_flight = False  # 2BW: the last step left the next batch's forwards running
        if self.weight_store is not None:
            self.weight_store.on_accumulate = self.reducer.grad_ready
            self.reducer.defer(deferred_parameters(self.stages))
        self.step_index = 0
        self._multiplier = 1.0  # the loss scale of the step being run
        self.sampler, self.tokens = self._build_data(tokens)
        self.memory = memory.MemoryMonitor(self.device)
        self.runtime = PipelineRuntime(
            stages=self.stages,
            actions=blueprint.schedule[self.pp_rank],
            num_stages=blueprint.num_stages,
            pp_size=config.parallel.pp,
            placement=blueprint.placement,
            p2p=P2P(grid.pp_comm, timeout=config.parallel.timeout),
            activation_shape=blueprint.spec.boundary_shape(
                blueprint.model, blueprint.microbatch_size
            ),
            dtype=self.dtype,
            device=self.device,
            loss_fn=self._scaled(self._loss_fn()),
            recompute=config.schedule.recompute,
            fail_at=self._fail_at(),
            weight_store=self.weight_store,
            fault_injection=fault.injection_from_env(),
            world_rank=launch_rank(),
            memory_meter=self.memory.meter,
        )
        self.stop_request: fault.StopRequest | None = None
        self.eval_runtime: PipelineRuntime | None = None  # built by the first evaluate()
        self.validation: evaluation.ValidationSet | None = None
        self.last_eval: StepResult | None = None  # what the last evaluation measured

    @property
    def asynchronous(self) -> bool:
        """Whether the schedule has no flush (2BW): two weight versions, staleness 1."""
        return self.config.schedule.name in ASYNC_SCHEDULES and not self.config.schedule.csv

    def _build_versions(self) -> list[dict]:
        """Two more copies of this rank's stages (W(-1) = W(0): both start as the masters).
        Each gradient a version's parameter receives goes straight into its master's bucket
        (in float32 for 16-bit runs, as the masters' own), so the dp reduction overlaps the
        backward as usual and a version holds no gradient of its own."""
        masters = dict(unique_named_parameters(self.stages))
        versions = []
        for _ in range(2):
            stages = self._build_stages()
            for stage in stages.values():
                stage.to(dtype=self.dtype)
            copy_weights(self.stages, stages)
            for name, param in unique_named_parameters(stages):
                hook = functools.partial(self._fold_version_grad, masters[name])
                param.register_post_accumulate_grad_hook(hook)
            versions.append(stages)
        return versions

    def _fold_version_grad(self, master: torch.nn.Parameter, version: torch.nn.Parameter):
        self.reducer.grad(master).add_(version.grad)
        version.grad = None
        self.reducer.grad_ready(master)

    def sync_versions(self) -> None:
        """2BW: both weight versions from the masters (after weights were loaded into them)."""
        for version in self.versions or ():
            copy_weights(self.stages, version)

    def use_schedule(self, schedule: Schedule) -> None:
        """Run `schedule` from the next step on (zb-auto rebuilt for measured costs). Its
        backwards must be split as the current one's are: the stages were built for that."""
        if uses_split_backward(schedule) != uses_split_backward(self.blueprint.schedule):
            raise ValueError("a schedule can only be replaced by one that splits backwards alike")
        self.blueprint = dataclasses.replace(self.blueprint, schedule=schedule)
        self.runtime.actions = schedule[self.pp_rank]

    def _norm_ids(self, named) -> set[int]:
        """ids of the parameters whose squares this rank adds to the global norm (once each).

        dp replicas hold equal gradients (dp rank 0 counts; under ZeRO each rank counts the
        shard it owns); replicated tensor-parallel parameters are equal on every tp rank (tp
        rank 0 counts); a tied copy duplicates its group's first member (that one counts).
        """
        if self.grid.dp_rank > 0 and not self.config.parallel.zero:
            return set()
        skip = tied.duplicate_copies(self.tied, self.stages)
        keep = set()
        for name, p in named:
            replicated = name not in self.tp_specs
            if id(p) in skip or (replicated and self.grid.tp_rank > 0):
                continue
            keep.add(id(p))
        return keep

    def _scaled(self, loss_fn):
        """float16: the loss times the loss scale (and 2**24 more at debug.overflow_step)."""
        if self.dtype != torch.float16:
            return loss_fn
        return lambda out, target: loss_fn(out, target) * self._multiplier

    def loss_multiplier(self) -> float:
        injected = self.step_index == self.config.debug.overflow_step
        return self.master.scaler.scale * (2.0**24 if injected else 1.0)

    def memory_tensors(self) -> dict[str, list[torch.Tensor]]:
        """The tensors this rank holds between steps, by kind (memory accounting)."""
        buckets = self.reducer.buckets
        shards = [b.grad_shard for b in buckets if b.grad_shard.data_ptr() != b.grad.data_ptr()]
        versions = [p for v in self.versions or () for _, p in unique_named_parameters(v)]
        return {
            "params": [b.param for b in buckets] + versions,
            "grads": [b.grad for b in buckets] + shards,
            "optimizer": self.master.tensors(),
            "comm": self.runtime.p2p.buffers(),
        }

    def _static_tensors_for_memory(self):
        """What the monitor needs around a step: the static tensors on CUDA (the allocator's
        peak is corrected by their growth), nothing on CPU (the meter counts activations)."""
        return self.memory_tensors() if self.memory.cuda else None

    def measured_memory(self) -> dict[str, int]:
        """This step's measured bytes by kind, of the rank holding the most (collective)."""
        mine = self.memory.measure(self.memory_tensors())
        values = torch.tensor([mine[k] for k in memory.MEASURED_KEYS], dtype=torch.float64)
        allreduce_(self.grid.cart, values, op=MPI.MAX, timeout=self.config.parallel.timeout)
        return {k: int(v) for k, v in zip(memory.MEASURED_KEYS, values.tolist(), strict=True)}

    def predicted_memory(self) -> dict:
        """This rank's predicted bytes (memory.predict_rank with its own local parameters)."""
        return memory.predict_rank(
            self.blueprint, self.config, self.pp_rank, self.params, device=self.device
        )

    def grad_fragments(self):
        """(global name, fragment) of the reduced gradients this rank owns (after a step's
        backward): whole parameters without ZeRO, flat ranges of them with it."""
        return [(f.name, f) for f in self.master.fragments]

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
        for s in b.stages_on(self.pp_rank):
            stage = build_stage(b.spec, b.model, b.partition.layers(s), self.config.train.seed)
            if self.tp.size > 1:
                self.tp_specs.update(parallelize_stage(stage, b.spec, b.model, self.tp))
            if self.config.schedule.recompute == "selective":
                enable_selective_recompute(stage)
            stages[s] = stage.to(device=self.device, dtype=master_dtype(self.dtype))
        return stages

    def _needs_data(self) -> bool:
        return 0 in self.stages or self.blueprint.num_stages - 1 in self.stages

    def _build_data(self, tokens=None):
        """Tokens and sampler on the ranks holding the first or last stage (inputs / targets);
        the sampler never draws the windows held out for validation (train.evaluate)."""
        if not self._needs_data():
            return None, None
        d = self.config.data
        if tokens is None:
            tokens = data.load_tokens(d.path or None, max_bytes=d.max_bytes)
        return evaluation.training_sampler(self.config, tokens), tokens

    def next_microbatches(self, peek: bool = False):
        """This step's micro-batches, a list of (inputs, targets); ranks in the middle of the
        pipe get placeholders. peek: the batch after, the sampler left where it is (2BW)."""
        M = self.config.schedule.microbatches
        if self.sampler is None:
            return [(None, None)] * M
        starts = self.sampler.peek_starts() if peek else self.sampler.next_starts()
        share = len(starts) // self.config.parallel.dp  # this replica's slice of the batch
        starts = starts[self.grid.dp_rank * share : (self.grid.dp_rank + 1) * share]
        inputs, targets = data.make_batch(self.tokens, starts, self.config.model.seq_len)
        return data.split_microbatches(inputs, targets, M)

    def evaluate(self) -> float:
        """Mean validation loss over train.eval_batches global batches (collective).

        The forward-only schedule through this rank's stages, by a second runtime: no graph,
        at most one micro-batch held per rank; the family's loss (vocabulary-parallel under
        tp) on the last stage, averaged over micro-batches and dp replicas as the training
        loss is. Touches no training state: not the sampler, not the RNG, not a gradient.
        """
        runtime = self._eval_runtime()
        batches = self._eval_microbatches()
        rng = torch.get_rng_state()
        modes = {s: stage.training for s, stage in self.stages.items()}
        for stage in self.stages.values():
            stage.train(False)
        try:
            result = runtime.step(batches)
        finally:
            for s, stage in self.stages.items():
                stage.train(modes[s])
            torch.set_rng_state(rng)
        self.last_eval = result
        # Like the training loss: on the last stage, the same on every tp rank (tp rank 0 counts).
        loss = result.loss if self.grid.tp_rank == 0 else 0.0
        total = torch.tensor([loss / self.config.parallel.dp], dtype=torch.float64)
        allreduce_(self.grid.cart, total, timeout=self.config.parallel.timeout)
        return float(total[0])

    def _eval_runtime(self) -> PipelineRuntime:
        """The forward-only runtime over this rank's stages (built once; shares the p2p)."""
        if self.eval_runtime is None:
            c, train = self.config, self.runtime
            M = c.schedule.microbatches * c.train.eval_batches
            place = self.blueprint.placement
            schedule = forward_only_schedule(c.parallel.pp, M, c.schedule.virtual, place)
            self.eval_runtime = PipelineRuntime(
                stages=self.stages,
                actions=schedule[self.pp_rank],
                num_stages=self.blueprint.num_stages,
                pp_size=c.parallel.pp,
                placement=place,
                p2p=train.p2p,
                activation_shape=train.activation_shape,
                dtype=self.dtype,
                device=self.device,
                loss_fn=self._loss_fn(),  # unscaled: no float16 loss scale in evaluation
                world_rank=train.world_rank,
                forward_only=True,
            )
        return self.eval_runtime

    def _eval_microbatches(self) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
        """Every micro-batch of one evaluation; ranks in the middle get placeholders."""
        c = self.config
        if self.tokens is None:
            return [(None, None)] * (c.schedule.microbatches * c.train.eval_batches)
        if self.validation is None:
            self.validation = evaluation.validation_set(c, self.tokens)
        return evaluation.microbatches(self.validation, c, self.grid.dp_rank)

    def forward_backward(self) -> StepResult:
        """Run the schedule once: gradients of this step are accumulated in .grad."""
        for p in self.params:
            p.grad = None
        self.runtime.step_index = self.step_index
        self.reducer.start_step()
        self.memory.begin_step(self._static_tensors_for_memory())
        self._multiplier = self.loss_multiplier()
        if self.versions is None:
            result = self.runtime.step(self.next_microbatches())
        else:
            result = self._asynchronous_step()
        # Tied copies are summed before the dp reduction (a sum either way; under ZeRO the
        # copies' shards would not line up afterwards); that releases their buckets.
        timeout = self.config.parallel.timeout
        for group in self.tied:
            if tied.needs_sum(group):
                grads = [self.reducer.grad(p) for p in group.copies]
                result.wait_seconds += tied.sum_tied_grads(group, grads, timeout)
                for p in group.copies:
                    self.reducer.grad_ready(p)
        result.wait_seconds += self.reducer.finish()
        self.memory.after_backward(self._static_tensors_for_memory())
        return result

    def _asynchronous_step(self) -> StepResult:
        """2BW: batch t on versions[t % 2] (W(t-1)), the next batch's first forwards on the
        other (W(t)); the gradients go into the masters' buckets (_fold_version_grad)."""
        t = self.step_index
        current, upcoming = self.versions[t % 2], self.versions[(t + 1) % 2]
        steady = self.blueprint.schedule[self.pp_rank]
        K, M = self.config.parallel.pp, self.config.schedule.microbatches
        first = [] if self._in_flight else twobw.warmup(K, M)[self.pp_rank]
        runtime = self.runtime
        runtime.stages, runtime.next_stages, runtime.actions = current, upcoming, first + steady
        batch = self.next_microbatches()
        result = runtime.step(batch, lookahead=self.next_microbatches(peek=True))
        self._in_flight = True
        return result

    def finish_step(self, result: StepResult) -> dict:
        """Global norm, clipping, LR, AdamW; returns the step's loss, norm and lr."""
        t = self.config.train
        # The loss lives on the last stage, the same on every tp rank: tp rank 0 reports it.
        loss = result.loss / self._multiplier if self.grid.tp_rank == 0 else 0.0
        # One reduction gives the global norm, the loss and (float16) the overflow verdict: a
        # non-finite sum of squares anywhere makes the sum non-finite everywhere.
        totals = torch.tensor(
            [self.master.square_sum(self.norm_ids), loss / self.config.parallel.dp],
            dtype=torch.float64,
        )
        waited = allreduce_(self.grid.cart, totals, timeout=self.config.parallel.timeout)
        lr = optim.lr_at(self.step_index, t)
        outcome = self.master.step(float(totals[0]), t.grad_clip, lr)
        if self.versions is not None:  # W(t+1) goes where batch t ran: batch t+2 runs on it
            copy_weights(self.stages, self.versions[self.step_index % 2])
        self.step_index += 1
        record = {"loss": float(totals[1]), "grad_norm": outcome["grad_norm"], "lr": lr,
                  "reduce_wait": waited, "skipped": outcome["skipped"]}  # fmt: skip
        if self.dtype == torch.float16:
            record["loss_scale"] = outcome["loss_scale"]
        if outcome["skipped"]:
            record["grad_norm"] = None  # an overflow: not a number to plot
        return record

    def train_step(self) -> dict:
        """One full optimizer step with its measurements (the same dict on every rank)."""
        start = time.perf_counter()
        result = self.forward_backward()
        record = self.finish_step(result)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # kernels are asynchronous: time their end
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
        record["memory"] = self.measured_memory()
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


def copy_weights(source: dict, target: dict) -> None:
    """Every parameter (and floating buffer) of `source`'s stages into `target`'s (equal
    structure: built alike)."""
    with torch.no_grad():
        for s, stage in source.items():
            pairs = zip(stage.state_dict().values(), target[s].state_dict().values(), strict=True)
            for src, dst in pairs:
                dst.copy_(src)


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
        f"(dp={p.dp} pp={p.pp} tp={p.tp}), schedule {s.csv or s.name}, "
        f"M={s.microbatches} micro-batches of {blueprint.microbatch_size}"
        f"{f', V={s.virtual} chunks per rank' if s.virtual > 1 else ''}, dtype {config.train.dtype}"
        f"{f', recompute {s.recompute}' if s.recompute != 'false' else ''}"
        f"{f', ZeRO-{p.zero}' if p.zero else ''}",
        blueprint.partition.describe(),
    ]
    return "\n".join(lines)
