"""Memory accounting per pipeline rank: predicted at start-up, measured every step.

Five parts, in bytes: parameters, gradients, optimizer state (fp32 master weights of a 16-bit
run plus AdamW's two moments), activations (the most a rank holds at once for the micro-batches
between their forward and their backward) and communication buffers.

* Static parts are a formula of (numel, dtype, zero, dp): predict_static. Measured from the
  tensors the trainer holds, each storage counted once: measure_static.
* Activations per micro-batch are traced, not guessed: the stage runs once on fake tensors
  (torch's FakeTensorMode on the run's device, as torch's own memory estimators do: no memory,
  no FLOPs, but the device's kernel choices, which decide what is saved) under a
  SavedTensorMeter, with the loss on the last stage: activation_bytes_per_microbatch. Walking a
  rank's actions with the runtime's hold/release rules turns that into the rank's peak:
  peak_activation_bytes (the schedule's own peak count, generalised to bytes and to V chunks of
  different sizes). Measured by the same meter, attached to the runtime (memory_meter): every
  tensor autograd saves during a stage forward, plus what the runtime keeps (stage inputs and
  outputs, a split backward's deferred weight-gradient work).

Nothing here talks to other ranks: the trainer reduces (MAX over ranks) and prints.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from hpcpipe.config import HALF
from hpcpipe.config import TORCH_DTYPES as DTYPES
from hpcpipe.models import api
from hpcpipe.pipeline import twobw
from hpcpipe.pipeline.schedule import (
    ASYNC_SCHEDULES,
    Action,
    Kind,
    peak_microbatches,
    placement_of,
    stages_of,
    uses_split_backward,
)

FP32 = 4  # bytes of a float32
# The measured record's keys, in the order a MAX-reduction vector carries them.
MEASURED_KEYS = ("params", "grads", "optimizer", "activations", "total")
PREDICTED_KEYS = ("params", "grads", "optimizer", "activations", "comm", "total")


def storage_key(tensor: torch.Tensor) -> int:
    """Identity of a tensor's storage: the address of its c10::StorageImpl.

    Works for real, meta and fake tensors alike (a meta storage has no data pointer); unique
    while the storage lives, so whoever keys by it must hold the storage (or a weakref to it).
    """
    return tensor.untyped_storage()._cdata


def storage_bytes(tensors: Iterable[torch.Tensor | None], seen: set | None = None) -> int:
    """Bytes of the distinct storages under `tensors` (whole storages; views count once).

    `seen` (storage keys) is updated, so several calls can share one deduplication.
    """
    seen = set() if seen is None else seen
    total = 0
    for t in tensors:
        if t is None:
            continue
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


# ---------------------------------------------------------------- the meter


class _Saved:
    """What the pack hook returns for one saved tensor: dropping it un-counts the tensor.

    Autograd drops it when it frees the graph (after backward, or when the graph is garbage).
    It holds a detached alias: the tensor itself may be the op's output, whose grad_fn holds
    this object, a reference cycle through C++ that Python's collector cannot see (the graph
    would never be freed when dropped without a backward).
    """

    __slots__ = ("key", "meter", "tensor")

    def __init__(self, meter: SavedTensorMeter, key: int, tensor: torch.Tensor):
        self.meter, self.key, self.tensor = meter, key, tensor

    def __del__(self):
        self.meter.release(self.key)


def _unpack(packed):
    return packed.tensor if type(packed) is _Saved else packed


class Hold:
    """Storages that the runtime keeps for a micro-batch; counted until released or dropped."""

    __slots__ = ("keys", "meter")

    def __init__(self, meter: SavedTensorMeter, keys: list[int]):
        self.meter, self.keys = meter, keys

    def release(self) -> None:
        """Stop counting (idempotent); dropping the last reference does the same."""
        keys, self.keys = self.keys, []
        for key in keys:
            self.meter.release(key)

    def __del__(self):
        self.release()


class _Live:
    """Reference-counted named buffers: the current sum of their bytes and its peak."""

    def __init__(self):
        self.refs: dict[object, list[int]] = {}
        self.current = self.peak = 0

    def acquire(self, key, nbytes: int) -> None:
        entry = self.refs.get(key)
        if entry is None:
            self.refs[key] = [1, nbytes]
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        else:
            entry[0] += 1

    def release(self, key) -> None:
        entry = self.refs.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            del self.refs[key]
            self.current -= entry[1]

    def transient(self, nbytes: int) -> None:
        self.peak = max(self.peak, self.current + nbytes)


class SavedTensorMeter(_Live):
    """Bytes of the tensors autograd saves for backward, alive now and at the peak.

    A context manager: inside `with meter:` every tensor autograd saves is counted until
    autograd frees it (after its backward, or when the graph is dropped). Storages count once
    however many views of them are saved or held, and whole (untyped storage nbytes). Storages
    given to `ignore` (the parameters: a matmul saves its weight) never count. `hold` counts
    tensors the caller keeps outside autograd (stage inputs and outputs) until the returned Hold
    is released or dropped. Any number of graphs may be alive at once (the micro-batches of a
    pipeline schedule); entering the meter while it is active (nested stage forwards) is fine.

    Works on real, meta and fake tensors. Cost: one dict lookup and a small object per saved
    tensor (about a microsecond), nothing per FLOP.

    NOTE: lock-free. Counters change in the pack hook, in _Saved.__del__ and in Hold; the
    orderings below allocate no garbage-collected object between reading and writing a counter,
    so a collection running a __del__ midway cannot interleave. CUDA's autograd engine frees
    saved tensors on its device thread while the Python thread that started backward waits,
    so the two never update at once.
    """

    def __init__(self):
        super().__init__()  # refs: storage key -> [references, nbytes]
        self._ignored: dict[int, weakref.ref] = {}  # storage key -> weakref to the storage
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)

    # --- context manager -------------------------------------------------------------------

    def __enter__(self) -> SavedTensorMeter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    # --- public ------------------------------------------------------------------------------

    def reset(self) -> None:
        """Start a new peak from what is alive now."""
        self.peak = self.current

    def ignore(self, tensors: Iterable[torch.Tensor | None]) -> None:
        """Never count these tensors' storages (parameters, buffers, a step's token batch).

        Each is forgotten when its storage is freed, so a later storage at the same address
        counts again. Calling again with the same tensors costs one lookup each.
        """
        for t in tensors:
            if t is None:
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key not in self._ignored:
                self._ignored[key] = weakref.ref(storage, self._forget(key))

    def hold(self, *tensors: torch.Tensor | None) -> Hold:
        """Count these tensors' storages (beside saved ones, once each) until the Hold goes."""
        keys = []
        for t in tensors:
            if t is None:
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key not in self._ignored:
                self.acquire(key, storage.nbytes())
                keys.append(key)
        return Hold(self, keys)

    def hold_closures(self, functions: Iterable[Callable], *tensors: torch.Tensor | None) -> Hold:
        """hold(tensors, and every tensor the closures of `functions` capture).

        For a split backward's deferred weight-gradient work (zero_bubble's closures keep each
        Linear's input and output gradient alive until W runs them); parameters are ignored.
        """
        captured = [
            cell.cell_contents
            for fn in functions
            for cell in (getattr(fn, "__closure__", None) or ())
            if isinstance(cell.cell_contents, torch.Tensor)
        ]
        return self.hold(*tensors, *captured)

    # --- internals ---------------------------------------------------------------------------

    def _forget(self, key: int) -> Callable:
        ignored = self._ignored
        return lambda ref: ignored.pop(key, None) if ignored.get(key) is ref else None

    def _pack(self, tensor: torch.Tensor):
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts
            return tensor
        key = storage._cdata
        if key in self._ignored:
            return tensor
        self.acquire(key, storage.nbytes())
        return _Saved(self, key, tensor.detach())


# ---------------------------------------------------------------- activations, predicted


@dataclass(frozen=True)
class StageBytes:
    """What one micro-batch of one stage holds, by storage, split as the runtime frees it.

    input: the stage input (a received or upstream activation; 0 on the first stage, whose
    tokens are data). output: the stage output (the loss on the last stage), which is the next
    stage's input when that stage is on the same rank. body: everything else autograd saves in
    the stage forward. after_backward: what a split backward keeps from B until W besides the
    input (each Linear's input and output gradient, the input's gradient); None: body, the
    plain rule "held until W".
    """

    input: int = 0
    output: int = 0
    body: int = 0
    after_backward: int | None = None

    @property
    def forward(self) -> int:
        """Held from F until B without recomputation."""
        return self.input + self.output + self.body

    @property
    def deferred(self) -> int:
        """Held from B until W under a split backward (the input aside)."""
        return self.body if self.after_backward is None else self.after_backward


def normalise_recompute(value) -> str:
    """schedule.recompute as "false", "full" or "selective" (booleans: True is "full")."""
    if value is True or value == "full":
        return "full"
    if value in (False, None, "false"):
        return "false"
    return str(value)


def _fake_mode(device: torch.device):
    """FakeTensorMode for a real device; None for meta (plain meta tensors)."""
    if device.type == "meta":
        return None
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode()


def _materialize(module: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Meta parameters and buffers -> empty ones on `device` (fake under FakeTensorMode).

    Module.to_empty / .to would swap tensors, which fake parameters refuse; ties are kept.
    """
    made: dict[int, torch.Tensor] = {}

    def empty(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in made:
            kind = dtype if t.is_floating_point() else t.dtype
            made[id(t)] = torch.empty(t.shape, dtype=kind, device=device)
        return made[id(t)]

    for sub in module.modules():
        for name, p in sub._parameters.items():
            if p is not None:
                new = made.get(id(p))
                if new is None:
                    new = made[id(p)] = nn.Parameter(empty(p), requires_grad=p.requires_grad)
                sub._parameters[name] = new
        for name, b in sub._buffers.items():
            if b is not None:
                sub._buffers[name] = empty(b)


def _meta_stage(spec: api.ModelSpec, config, layer_indices) -> api.Stage:
    """The stage's layers on the meta device, tied where the stage holds a whole group."""
    with torch.device("meta"):
        layers = {i: spec.build_layer(config, i) for i in layer_indices}
    api.tie_within(spec, config, layers)
    return api.Stage(layers)


def activation_bytes_per_microbatch(
    spec: api.ModelSpec,
    model_config,
    layer_indices: Sequence[int],
    microbatch_size: int,
    dtype: torch.dtype,
    recompute_mode: str = "false",
    *,
    split_backward: bool = False,
    device: torch.device | str = "cpu",
    prepare: Callable[[nn.Module], None] | None = None,
) -> StageBytes:
    """Activation bytes one micro-batch of a stage holds, traced on fake tensors.

    The stage (layers `layer_indices`, the loss after the model's last layer) runs once under a
    SavedTensorMeter on FakeTensors of `device` (device="meta": plain meta tensors, whose
    kernel choices may differ from a real device's: CPU attention saves q, k, v and the output
    where the meta kernel saves the s x s scores). recompute_mode "selective" switches the
    stage's attention cores to recomputation as the trainer does, so their saved tensors drop
    out by themselves; "full" and "false" trace the same stage (peak_activation_bytes applies
    the full-recompute rule). split_backward also runs the backward with zero_bubble's deferred
    Linear weight gradients to measure what stays until W. prepare(stage), if given, runs
    before the trace (any other change the trainer makes to its stages).
    """
    device = torch.device(device)
    mode = _fake_mode(device)
    if mode is None:  # meta: everything, parameters included, is built on meta
        device = torch.device("meta")
    indices = list(layer_indices)
    last = indices[-1] == spec.num_layers(model_config) - 1
    stage = _meta_stage(spec, model_config, indices)
    with mode if mode is not None else contextlib.nullcontext(), torch.enable_grad():
        if mode is not None:
            _materialize(stage, device, dtype)
        elif dtype != torch.float32:
            stage = stage.to(dtype)
        if normalise_recompute(recompute_mode) == "selective":
            api.enable_selective_recompute(stage)
        store = None
        if split_backward:
            from hpcpipe.pipeline.zero_bubble import WeightGradStore, enable_split_backward

            store = WeightGradStore()
            enable_split_backward(stage, store)
        if prepare is not None:
            prepare(stage)
        first = indices[0] == 0
        return _trace(spec, model_config, stage, first, last, microbatch_size, dtype, device, store)


def _trace(spec, config, stage, first, last, batch, dtype, device, store) -> StageBytes:
    meter = SavedTensorMeter()
    meter.ignore([*stage.parameters(), *stage.buffers()])
    if first:
        x = torch.zeros(batch, config.seq_len, dtype=torch.long, device=device)
        meter.ignore([x])  # tokens are data, not activations (the runtime ignores them too)
    else:
        shape = tuple(spec.boundary_shape(config, batch))
        x = torch.empty(shape, dtype=dtype, device=device).requires_grad_()
    with meter:
        out = stage(x)
        if last:
            target = torch.zeros(batch, config.seq_len, dtype=torch.long, device=device)
            meter.ignore([target])
            out = spec.loss(out, target) / 1
    held = meter.hold(x, out)  # the runtime keeps both until B
    forward = meter.current
    input_bytes = 0 if first else storage_bytes([x])
    output_bytes = 0 if storage_key(out) == storage_key(x) else storage_bytes([out])
    after = None
    if store is not None:
        grad = None if last else torch.ones_like(out)
        store.begin()
        try:
            torch.autograd.backward(out, grad)
        finally:
            work = store.end()
        del grad
        held.release()
        del out
        held = meter.hold(x)  # the input stays until W
        kept = meter.current  # the input, and nothing else once the graph is freed
        held_after = meter.hold_closures(work, x.grad)
        after = meter.current - kept
        held_after.release()
    body = forward - input_bytes - output_bytes
    return StageBytes(input_bytes, output_bytes, body, after)


def _as_stage_bytes(value) -> StageBytes:
    return value if isinstance(value, StageBytes) else StageBytes(body=int(value))


def peak_activation_bytes(
    actions: Sequence[Action],
    bytes_of_stage: Mapping[int, int | StageBytes],
    split_backward: bool = False,
    recompute_mode: str = "false",
) -> int:
    """The most activation bytes one rank holds at once while it runs `actions`.

    The runtime's rules, action by action: F holds the micro-batch's stage input, output and
    saved tensors; B frees the saved tensors and the output, and the input unless the backward
    is split (then W frees the input and what B deferred). With recompute_mode "full" F holds
    only the input, and B first recomputes the forward: one micro-batch's saved tensors and
    output exist for the moment (the transient counts in the peak). A stage output and the next
    stage's input are one buffer when both stages are on this rank.

    bytes_of_stage maps each of the rank's stages to its StageBytes or to a plain byte count per
    micro-batch (all of it held from F until B, or W); with plain counts and equal stages the
    peak is validate(...).peak_activations[rank] times the count.
    """
    full = normalise_recompute(recompute_mode) == "full"
    stages = {s: _as_stage_bytes(b) for s, b in bytes_of_stage.items()}
    live = _Live()
    for a in actions:
        if not a.is_compute:
            continue
        s, m = a.stage, a.microbatch
        sb = stages[s]
        # a stage's output and the next stage's input are one buffer: ("edge", s + 1, m)
        edge_in, edge_out = ("edge", s, m), ("edge", s + 1, m)
        body, deferred = ("body", s, m), ("deferred", s, m)
        if a.kind == Kind.F:
            live.acquire(edge_in, sb.input)
            if not full:
                live.acquire(body, sb.body)
                live.acquire(edge_out, sb.output)
        elif a.kind in (Kind.B, Kind.I):
            if full:
                live.transient(sb.body + sb.output)  # the recomputed forward, during B
            else:
                live.release(body)
                live.release(edge_out)
            if split_backward:
                live.acquire(deferred, sb.deferred)
            else:
                live.release(edge_in)
        else:  # W
            live.release(deferred)
            live.release(edge_in)
    return live.peak


def predict_comm(actions: Sequence[Action], buffer_bytes: int) -> int:
    """Bytes of the receive buffers one rank's p2p pool ends up holding.

    A RECV posts a pooled buffer; the runtime gives it back when the micro-batch is done here
    (after B, or W under a split backward); the pool keeps every buffer it made, so its size is
    the most receives outstanding at once. Forward and backward messages share one shape.
    On CPU the received stage inputs are these buffers, so they are in the activations too.
    """
    outstanding: dict[tuple[int, int], int] = {}
    live = peak = 0
    for a in actions:
        key = (a.stage, a.microbatch)
        if a.kind in (Kind.RECV_F, Kind.RECV_B):
            outstanding[key] = outstanding.get(key, 0) + 1
            live += 1
            peak = max(peak, live)
        elif a.kind in (Kind.B, Kind.W):  # done here: a full backward, or a split one's W
            live -= outstanding.pop(key, 0)
    return peak * buffer_bytes


# ---------------------------------------------------------------- static parts


def predict_static(
    param_numels: int | Iterable[int], dtype: torch.dtype, zero: int = 0, dp: int = 1
) -> dict[str, int]:
    """params, grads and optimizer bytes of `param_numels` parameters trained in `dtype`.

    params: stored in dtype. grads: float32 buffers for 16-bit runs, else dtype. optimizer:
    float32 master weights (16-bit runs only) plus AdamW's exp_avg and exp_avg_sq (float32 for
    16-bit runs, else dtype); ZeRO-1 shards it over the dp ranks.
    """
    numel = param_numels if isinstance(param_numels, int) else sum(param_numels)
    size = torch.empty((), dtype=dtype).element_size()
    half = dtype in HALF
    wide = FP32 if half else size  # gradients, moments and masters are never 16-bit
    state_numel = math.ceil(numel / dp) if zero else numel
    return {
        "params": numel * size,
        "grads": numel * wide,
        "optimizer": state_numel * ((FP32 if half else 0) + 2 * wide),
    }


def measure_static(tensors_by_kind: Mapping[str, Iterable[torch.Tensor | None]]) -> dict[str, int]:
    """Bytes of each kind's distinct storages ({"params": [...], "grads": [...], ...}).

    A storage listed under two kinds counts under the first one only, so the parts add up.
    """
    seen: set[int] = set()
    return {kind: storage_bytes(tensors, seen) for kind, tensors in tensors_by_kind.items()}


# ---------------------------------------------------------------- one rank, predicted


def predict_rank(
    blueprint,
    config,
    pp_rank: int,
    params: Iterable[torch.Tensor] | int | None = None,
    *,
    device: torch.device | str = "cpu",
    prepare: Callable[[nn.Module], None] | None = None,
) -> dict:
    """Predicted bytes of one pipeline rank: params, grads, optimizer, activations, comm, total.

    blueprint: the trainer's Blueprint (spec, model, partition, schedule, num_stages,
    microbatch_size); config: the run's Config. params: the rank's parameters (tensors, each
    counted once; numels under tensor parallelism), their total numel, or None to count the
    rank's stages unsplit. Also returned: "peak_microbatches" (the schedule's count) and
    "per_microbatch" {stage: StageBytes}.

    NOTE: activations are traced on the unsplit stage: under tensor parallelism (tp > 1) they
    are an upper bound (sharded layers hold about 1/tp of theirs).
    """
    p, s = config.parallel, config.schedule
    dtype = config.train.dtype
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    mode = normalise_recompute(s.recompute)
    split = uses_split_backward(blueprint.schedule)
    b = blueprint
    K = len(b.schedule)  # the schedule says where each stage lives (round robin or V shape)
    stages = stages_of(placement_of(b.schedule, K, b.num_stages // K), pp_rank)
    options = {"split_backward": split, "device": device, "prepare": prepare}
    per_stage = {
        stage: activation_bytes_per_microbatch(
            b.spec, b.model, b.partition.layers(stage), b.microbatch_size, dtype, mode, **options
        )
        for stage in stages
    }
    asynchronous = s.name in ASYNC_SCHEDULES and not getattr(s, "csv", "")
    # 2BW: a step starts with the last one's forwards in flight; three steps in a row hold
    # what any one does
    actions = twobw.unrolled(K, s.microbatches, 3)[pp_rank] if asynchronous else b.schedule[pp_rank]
    numel = _numel(params, b, stages)
    static = predict_static(numel, dtype, getattr(p, "zero", 0), p.dp)
    if asynchronous:  # the buckets the optimizer updates, and the two weight versions
        static["params"] *= 3
    boundary = math.prod(b.spec.boundary_shape(b.model, b.microbatch_size))
    comm = predict_comm(actions, boundary * torch.empty((), dtype=dtype).element_size())
    activations = peak_activation_bytes(actions, per_stage, split, mode)
    total = sum(static.values()) + activations + comm
    return {
        "pp_rank": pp_rank,
        **static,
        "activations": activations,
        "comm": comm,
        "total": total,
        "peak_microbatches": peak_microbatches(actions),
        "per_microbatch": per_stage,
    }


def _numel(params, blueprint, stages) -> int:
    if isinstance(params, int):
        return params
    if params is not None:
        seen, total = set(), 0
        for t in params:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel()
        return total
    total = 0
    for stage in stages:  # each stage its own copies of tied parameters, as the trainer's
        module = _meta_stage(blueprint.spec, blueprint.model, blueprint.partition.layers(stage))
        total += sum(t.numel() for t in module.parameters())
    return total


# ---------------------------------------------------------------- printing


_UNITS = (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10), ("B", 1))


def _unit(largest: int) -> tuple[str, int]:
    for name, size in _UNITS:
        if largest >= size:
            return name, size
    return "B", 1


def describe(predictions: Sequence[Mapping]) -> str:
    """The start-up table: one row per pipeline rank, bytes in one unit for the whole table.

    Each prediction is predict_rank's dict (only the PREDICTED_KEYS, "pp_rank" and, when
    present, "peak_microbatches" are read).
    """
    name, size = _unit(max((int(p["total"]) for p in predictions), default=0))
    columns = ("params", "grads", "optimizer", "activations", "comm", "total")
    width = 12
    header = f"{'pp rank':>7}" + "".join(f"{c:>{width}}" for c in columns)
    lines = [f"memory per pipeline rank, predicted ({name}):", header]
    for p in predictions:
        cells = "".join(f"{p[c] / size:>{width}.2f}" for c in columns)
        held = p.get("peak_microbatches")
        note = f"   activations: {held} micro-batch{'es' if held != 1 else ''} at the peak"
        lines.append(f"{p['pp_rank']:>7}{cells}{note if held is not None else ''}")
    return "\n".join(lines)


# ---------------------------------------------------------------- one rank, measured


def measure(
    tensors_by_kind: Mapping[str, Iterable[torch.Tensor | None]],
    activations: int,
    device: torch.device | str = "cpu",
) -> dict[str, int]:
    """Measured {"params", "grads", "optimizer", "activations", "total"} of this rank.

    Static parts from the tensors (measure_static). total: on CUDA the allocator's high-water
    mark since its peak was last reset (torch.cuda.max_memory_allocated: everything, comm and
    transients included); elsewhere the parts plus "comm" plus activations (a received stage
    input is in both comm and activations on CPU: an upper bound by those buffers).
    """
    device = torch.device(device)
    static = measure_static(tensors_by_kind)
    record = {k: static.get(k, 0) for k in ("params", "grads", "optimizer")}
    record["activations"] = int(activations)
    if device.type == "cuda":
        record["total"] = int(torch.cuda.max_memory_allocated(device))
    else:
        record["total"] = sum(static.values()) + int(activations)
    return record


class MemoryMonitor:
    """One rank's measured memory, step by step (what the trainer wires in).

        monitor = MemoryMonitor(device)           # runtime.memory_meter = monitor.meter
        monitor.begin_step(tensors)                # after the gradients are zeroed, before F
        result = runtime.step(...)
        monitor.after_backward(tensors)            # before the optimizer step
        ...optimizer...
        record["memory"] = monitor.measure(tensors)   # then MAX over ranks, MEASURED_KEYS

    Activations on CPU (and any non-CUDA device): the meter's peak over the step, i.e. the
    saved tensors and what the runtime holds. On CUDA: the allocator's peak between begin_step
    and after_backward above what was allocated at begin_step, less the growth of the static
    tensors meanwhile (gradients allocated by backward); it includes what the meter does not
    see (backward's transient gradients, kernel workspaces, received buffers).
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.meter = SavedTensorMeter()
        self.activations = 0
        self._base = self._static_base = 0

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def begin_step(self, tensors_by_kind: Mapping | None = None) -> None:
        """Start the step's peaks."""
        self.meter.reset()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self._static_base = _static_sum(tensors_by_kind)

    def after_backward(self, tensors_by_kind: Mapping | None = None) -> int:
        """The step's activation peak (call when forward and backward are done)."""
        if self.cuda:
            peak = torch.cuda.max_memory_allocated(self.device)
            grown = _static_sum(tensors_by_kind) - self._static_base
            self.activations = max(0, peak - self._base - grown)
        else:
            self.activations = self.meter.peak
        return self.activations

    def measure(self, tensors_by_kind: Mapping[str, Iterable[torch.Tensor | None]]) -> dict:
        """This rank's record (after_backward's activations; see measure for total)."""
        return measure(tensors_by_kind, self.activations, self.device)


def _static_sum(tensors_by_kind: Mapping | None) -> int:
    return sum(measure_static(tensors_by_kind).values()) if tensors_by_kind else 0
