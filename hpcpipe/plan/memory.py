"""Bytes per GPU of a layout: parameters, gradients, optimizer state, activations, buffers.

The trainer's own prediction (hpcpipe.train.memory.predict_rank) traces whole stages and walks
a built schedule: exact, but too slow for a planner that scores thousands of layouts of models
up to 175B parameters. This module gives the same numbers from cached pieces:

* Activations of one micro-batch are traced per distinct layer, not per stage. Layers with the
  same class and parameter shapes (every transformer block) share one trace, on FakeTensors
  (no memory, no FLOPs), at micro-batch sizes 1 and 2; every part is then a line a + c*b in the
  micro-batch size b (LayerBytes). What a stage keeps of the boundary between two of its layers
  (the per-layer traces count it as one layer's output and the next one's input, runtime-held)
  comes from one trace of each distinct pair of neighbours (JunctionBytes): a stage's
  StageBytes is the sum, and equals the trace of the whole stage.
* Tensor parallelism traces the sharded layer: the family's TensorParallelPlan is applied with
  a TPContext whose "all-reduce" is a copy (tp ranks hold identical shapes; only shapes decide
  bytes), so the trace sees the sliced weights, the sharded activations and the
  vocabulary-parallel loss of one tp rank.
* The schedule's hold/release walk (train.memory.peak_activation_bytes' rules) runs once per
  (schedule, K, M, V, full recompute) on symbolic bytes: it records, per rank, how many of each
  (chunk, part) item are alive at every moment that could be the peak, and keeps the distinct
  count vectors (RankPeaks). The peak for any stage bytes is the largest dot product. Long
  schedules are walked at a smaller M with the same warm-up, steady state and cool-down (see
  _walked_microbatches), GPipe at M = 1 and scaled; tests check the counts against
  peak_activation_bytes, predict_comm and peak_microbatches on built schedules.

Static parts are train.memory.predict_static of the rank's (sharded) parameter count, each
stage holding its own copy of tied parameters, as the trainer does.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from hpcpipe.config import TORCH_DTYPES, recompute_mode
from hpcpipe.models import api
from hpcpipe.pipeline.schedule import (
    SCHEDULES,
    SPLIT_BACKWARD,
    Action,
    Kind,
    ScheduleError,
    interleaved_round,
    loop_placement,
    named_placement,
    stages_of,
)
from hpcpipe.train.memory import StageBytes, activation_bytes_per_microbatch, predict_static

# ---------------------------------------------------------------- bytes as lines in b


@dataclass(frozen=True)
class Affine:
    """constant + per_sample * b: bytes of one micro-batch of b sequences."""

    constant: int = 0
    per_sample: int = 0

    def at(self, microbatch_size: int) -> int:
        return self.constant + self.per_sample * microbatch_size

    def __add__(self, other: Affine) -> Affine:
        return Affine(self.constant + other.constant, self.per_sample + other.per_sample)

    @classmethod
    def through(cls, at_1: int, at_2: int) -> Affine:
        """The line through (1, at_1) and (2, at_2)."""
        return cls(2 * at_1 - at_2, at_2 - at_1)


@dataclass(frozen=True)
class LayerBytes:
    """One micro-batch of one layer as a one-layer stage (StageBytes' parts, lines in b).

    deferred: what a split backward keeps from B until W (None without a split backward).
    """

    input: Affine
    output: Affine
    body: Affine
    deferred: Affine | None = None

    def at(self, microbatch_size: int) -> StageBytes:
        b = microbatch_size
        after = None if self.deferred is None else self.deferred.at(b)
        return StageBytes(self.input.at(b), self.output.at(b), self.body.at(b), after)


@dataclass(frozen=True)
class JunctionBytes:
    """What a stage holding layers k and k+1 keeps beyond their two one-layer traces.

    body: the boundary activation when a stage's autograd saves it (a LayerNorm saving its
    input), 0 when nothing does (Llama's bfloat16 RMSNorm saves its float32 upcast instead):
    the one-layer traces count it only as the runtime-held output and input. deferred: under a
    split backward, usually minus the boundary's gradient, which both one-layer traces keep
    (one as the gradient it was given, one as its input's gradient) and a stage keeps once.
    """

    body: Affine
    deferred: Affine | None = None


def _line_of(at_1: StageBytes, at_2: StageBytes) -> LayerBytes:
    deferred = None
    if at_1.after_backward is not None:
        deferred = Affine.through(at_1.after_backward, at_2.after_backward)
    return LayerBytes(
        Affine.through(at_1.input, at_2.input),
        Affine.through(at_1.output, at_2.output),
        Affine.through(at_1.body, at_2.body),
        deferred,
    )


# ---------------------------------------------------------------- which layers are alike


@functools.lru_cache(maxsize=64)
def layer_signatures(spec: api.ModelSpec, model_config) -> tuple:
    """A hashable description of every layer: equal ones trace and count alike.

    Class, parameter and buffer shapes and dtypes, and whether the layer is the first (it takes
    tokens) or the last (the loss follows it). Built on the meta device.
    """
    n = spec.num_layers(model_config)
    with torch.device("meta"):
        layers = [spec.build_layer(model_config, i) for i in range(n)]
    return tuple(_signature(layer, i == 0, i == n - 1) for i, layer in enumerate(layers))


def _signature(layer: torch.nn.Module, first: bool, last: bool) -> tuple:
    def shapes(named):
        return tuple((name, tuple(t.shape), t.dtype) for name, t in named)

    kind = f"{type(layer).__module__}.{type(layer).__qualname__}"
    return (kind, shapes(layer.named_parameters()), shapes(layer.named_buffers()), first, last)


@functools.lru_cache(maxsize=64)
def _representatives(spec: api.ModelSpec, model_config) -> tuple[tuple[int, ...], ...]:
    """(index of the first layer like layer i, index of the first pair like (i, i+1)) per i."""
    signatures = layer_signatures(spec, model_config)
    first_layer: dict = {}
    first_pair: dict = {}
    result = []
    for i, signature in enumerate(signatures):
        pair = (signature, signatures[i + 1]) if i + 1 < len(signatures) else None
        result.append(
            (first_layer.setdefault(signature, i), first_pair.setdefault(pair, i) if pair else -1)
        )
    return tuple(result)


# ---------------------------------------------------------------- tensor parallelism


@functools.lru_cache(maxsize=8)
def _local_tp_class():
    """TPContext whose communication stays on this process (imported only when tp > 1)."""
    from hpcpipe.parallel.tensor_parallel import TPContext

    class LocalTP(TPContext):
        """The sum over tp ranks of identical tensors, as shapes go: a copy of the tensor.

        A copy, not the tensor itself, because the real all-reduce returns a new tensor: the
        trace must see the same storages the runtime makes. Values are never read (FakeTensors
        or meta tensors), so the MAX of the vocabulary-parallel loss is a copy too.
        """

        def allreduce(self, tensor: torch.Tensor, op=None) -> torch.Tensor:
            return tensor.detach().contiguous().clone()

    return LocalTP


def local_tp(tp: int):
    """tp rank 0 of `tp` ranks, communicating with no one (every tp rank holds its shapes)."""
    return _local_tp_class()(comm=None, rank=0, size=tp)


def tp_trace_options(spec: api.ModelSpec, model_config, tp: int) -> tuple[api.ModelSpec, dict]:
    """(spec, options) for activation_bytes_per_microbatch to trace one tp rank of a stage.

    Under tp > 1 the spec's loss is the vocabulary-parallel one and options["prepare"] shards
    the stage by the family's plan with local_tp(tp), as the trainer's parallelize_stage does.
    """
    if tp == 1:
        return spec, {}
    from hpcpipe.parallel.tensor_parallel import parallelize_stage, require_plan

    context = local_tp(tp)
    plan = require_plan(spec)
    plan.check(model_config, tp)  # TensorParallelError (a ValueError) names the shape

    def shard(stage) -> None:
        # after the stage's parameters became FakeTensors: slicing them allocates nothing
        parallelize_stage(stage, spec, model_config, context)

    sharded_spec = dataclasses.replace(spec, loss=plan.loss(model_config, context))
    return sharded_spec, {"prepare": shard}


# ---------------------------------------------------------------- traced activations


@functools.lru_cache(maxsize=4096)
def _traced(
    spec: api.ModelSpec,
    model_config,
    indices: tuple[int, ...],
    dtype: torch.dtype,
    mode: str,
    split: bool,
    tp: int,
    device: str,
) -> LayerBytes:
    """The stage of `indices` traced at micro-batch sizes 1 and 2, as lines in b."""
    traced_spec, options = tp_trace_options(spec, model_config, tp)

    def trace(b: int) -> StageBytes:
        return activation_bytes_per_microbatch(
            traced_spec, model_config, indices, b, dtype, mode,
            split_backward=split, device=device, **options,
        )  # fmt: skip

    return _line_of(trace(1), trace(2))


def _trace_key(dtype, recompute, split_backward: bool, tp: int, device) -> tuple:
    # "full" traces the stage as "false" does (peak_activation_bytes applies its rule)
    mode = recompute_mode(recompute)
    return (
        _dtype(dtype),
        "false" if mode == "full" else mode,
        bool(split_backward),
        tp,
        str(device),
    )


def layer_bytes(
    spec: api.ModelSpec,
    model_config,
    index: int,
    *,
    dtype: torch.dtype | str,
    recompute: str = "false",
    split_backward: bool = False,
    tp: int = 1,
    device: torch.device | str = "cpu",
) -> LayerBytes:
    """Activation bytes of one micro-batch of layer `index` alone (on one of `tp` ranks).

    Traced once per distinct layer (layer_signatures) and recompute mode, dtype, split
    backward, tp and device; a later call is a dictionary lookup.
    """
    first_like, _ = _representatives(spec, model_config)[index]
    key = _trace_key(dtype, recompute, split_backward, tp, device)
    return _traced(spec, model_config, (first_like,), *key)


def junction_bytes(
    spec: api.ModelSpec,
    model_config,
    index: int,
    *,
    dtype: torch.dtype | str,
    recompute: str = "false",
    split_backward: bool = False,
    tp: int = 1,
    device: torch.device | str = "cpu",
) -> JunctionBytes:
    """What a stage holding layers `index` and `index + 1` keeps beyond their own traces.

    Traced once per distinct pair of neighbours (a stage of the first such pair).
    """
    _, pair = _representatives(spec, model_config)[index]
    if pair < 0:
        raise ValueError(f"layer {index} is the model's last: it has no junction after it")
    key = _trace_key(dtype, recompute, split_backward, tp, device)
    both = _traced(spec, model_config, (pair, pair + 1), *key)
    options = {
        "dtype": dtype, "recompute": recompute, "split_backward": split_backward,
        "tp": tp, "device": device,
    }  # fmt: skip
    left = layer_bytes(spec, model_config, pair, **options)
    right = layer_bytes(spec, model_config, pair + 1, **options)
    body = both.body + _negated(left.body) + _negated(right.body)
    deferred = None
    if both.deferred is not None:
        deferred = both.deferred + _negated(left.deferred) + _negated(right.deferred)
    return JunctionBytes(body, deferred)


def _negated(line: Affine) -> Affine:
    return Affine(-line.constant, -line.per_sample)


def stage_activation_bytes(
    spec: api.ModelSpec,
    model_config,
    layers: range,
    microbatch_size: int,
    *,
    dtype: torch.dtype | str,
    recompute: str = "false",
    split_backward: bool = False,
    tp: int = 1,
    device: torch.device | str = "cpu",
) -> StageBytes:
    """StageBytes of one micro-batch of a stage holding `layers` (a range [i, j)).

    The input of its first layer, the output of its last, the bodies (and deferred parts)
    summed with the junctions between neighbours. Equals activation_bytes_per_microbatch of
    the whole stage (tests check it), from traces of single layers and pairs.
    """
    if not layers:
        raise ValueError("a stage holds at least one layer")
    options = {
        "dtype": dtype, "recompute": recompute, "split_backward": split_backward,
        "tp": tp, "device": device,
    }  # fmt: skip
    per_layer = [layer_bytes(spec, model_config, i, **options) for i in layers]
    junctions = [junction_bytes(spec, model_config, i, **options) for i in layers[:-1]]
    body = sum((p.body for p in per_layer), Affine()) + sum((j.body for j in junctions), Affine())
    after = None
    if split_backward:
        deferred = [p.deferred for p in per_layer] + [j.deferred for j in junctions]
        after = sum(deferred, Affine()).at(microbatch_size)
    b = microbatch_size
    return StageBytes(per_layer[0].input.at(b), per_layer[-1].output.at(b), body.at(b), after)


# ---------------------------------------------------------------- parameters


@functools.lru_cache(maxsize=4096)
def _layer_numels(spec: api.ModelSpec, model_config, index: int, tp: int) -> dict[str, int]:
    """{local parameter name: numel} of layer `index` as one tp rank holds it."""
    with torch.device("meta"):  # the vocabulary slices are made on meta too: no memory
        layer = spec.build_layer(model_config, index)
        if tp > 1:
            from hpcpipe.parallel.tensor_parallel import require_plan

            plan = require_plan(spec)
            plan.check(model_config, tp)
            plan.parallelize(layer, index, model_config, local_tp(tp))
    return {name: p.numel() for name, p in layer.named_parameters()}


def layer_param_numels(spec: api.ModelSpec, model_config, index: int, tp: int = 1) -> dict:
    """{local parameter name: numel} of layer `index` on one of `tp` ranks (padded vocab)."""
    first_like, _ = _representatives(spec, model_config)[index]
    return _layer_numels(spec, model_config, first_like, tp)


@functools.lru_cache(maxsize=65536)
def stage_param_numel(spec: api.ModelSpec, model_config, layers: range, tp: int = 1) -> int:
    """Parameters one tp rank of a stage holding `layers` keeps.

    A tie group whose members all sit in the stage is one Parameter (api.tie_within); members
    in different stages are separate copies, each counted by its stage, as the trainer holds
    them.
    """
    numels = {i: layer_param_numels(spec, model_config, i, tp) for i in layers}
    total = sum(sum(n.values()) for n in numels.values())
    for names in spec.tie_groups(model_config).values():
        held = [api.split_name(name) for name in names if api.split_name(name)[0] in numels]
        total -= sum(numels[index][name] for index, name in held[1:])
    return total


# ---------------------------------------------------------------- the schedule walk, symbolic

# The parts of a chunk's micro-batch a rank can hold; TRANSIENT_* are what a full-recompute
# backward rebuilds for the moment (kept apart from the held parts: see _gpipe_peaks).
INPUT, OUTPUT, BODY, DEFERRED, TRANSIENT_BODY, TRANSIENT_OUTPUT = range(6)
PARTS = 6
_HELD = np.array([True, True, True, True, False, False])


@dataclass(frozen=True, eq=False)
class RankPeaks:
    """One rank's schedule as far as memory goes, for any stage bytes.

    candidates: count vectors, one row each (PARTS entries per local chunk: how many of its
    micro-batches' inputs, outputs, bodies and deferred parts are held, and the transient
    recomputed body and output), of the moments that may be the peak (distinct; the bytes at a
    moment are its row times the parts' bytes). comm_buffers: the most receive buffers
    outstanding (predict_comm's count). peak_microbatches: schedule.peak_microbatches.
    """

    candidates: np.ndarray
    comm_buffers: int
    peak_microbatches: int

    def activation_bytes(self, chunk_bytes: Sequence[StageBytes]) -> int:
        """peak_activation_bytes of the rank for these StageBytes of its chunks 0..V-1."""
        weights = [
            part
            for sb in chunk_bytes
            for part in (sb.input, sb.output, sb.body, sb.deferred, sb.body, sb.output)
        ]
        if len(weights) != self.candidates.shape[1]:
            raise ValueError(f"{len(chunk_bytes)} StageBytes for {self.chunks} chunks")
        if not len(self.candidates):
            return 0
        # exact integers: int64 unless the largest possible sum could overflow it
        bound = max(map(abs, weights)) * int(np.abs(self.candidates).max()) * len(weights)
        kind = np.int64 if bound < 2**62 else object
        return int((self.candidates.astype(kind) @ np.array(weights, dtype=kind)).max())

    @property
    def chunks(self) -> int:
        return self.candidates.shape[1] // PARTS


def _compute_actions(name: str, K: int, M: int, V: int) -> dict[int, list[Action]]:
    """The schedule's compute actions per rank, generated without lowering or validation.

    build_schedule validates every schedule it makes (a simulation: minutes at K=64, M=1536);
    the generators are the ones it validates, and tests/test_schedule.py checks them.
    """
    generate = SCHEDULES.get(name)
    if generate is None:
        raise ScheduleError(f"unknown training schedule {name!r}; valid: {', '.join(SCHEDULES)}")
    return generate(K, M, V)


def _walked_microbatches(name: str, K: int, M: int, V: int) -> int:
    """The M at which to walk: one with the same peaks as M (tests check it on a grid).

    After its warm-up every schedule but GPipe repeats one pattern, so its count vectors repeat
    too: a walk needs the warm-up, a steady state long enough to hold one period plus the
    warm-up's and W lag's reach, and the cool-down (whose vectors depend only on the distance
    to the end). 1F1B and ZB-H1: warm-up and lag below K each, period 1, so 3K + 2 is plenty.
    Interleaved (-zb): rounds of R micro-batches (K <= R < 2K), period R*V chunk-forwards,
    warm-up under (V+1)R, lag under 2R: 3 + ceil(4/V) rounds of the same R are plenty (fewer
    rounds keep R, see interleaved_round, and keep M >= 2K, which sets -zb's lag).
    """
    if name in ("1f1b", "zb-h1"):
        return min(M, 3 * K + 2)
    if name in ("interleaved", "interleaved-zb") and M > K:
        R = interleaved_round(K, M)
        return R * min(M // R, 3 + math.ceil(4 / V))
    return M


def _check_dimensions(K: int, M: int, V: int) -> None:
    for label, value in (("K (ranks)", K), ("M (micro-batches)", M), ("V (chunks)", V)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ScheduleError(f"{label} must be an integer >= 1, got {value!r}")


@functools.lru_cache(maxsize=1024)
def schedule_peaks(name: str, K: int, M: int, V: int = 1, full: bool = False) -> tuple:
    """RankPeaks of every rank of schedule `name` (K ranks, M micro-batches, V chunks).

    full: schedule.recompute = "full" (F keeps only the input; B rebuilds the rest). Raises
    ScheduleError as build_schedule does for shapes the schedule refuses.
    """
    _check_dimensions(K, M, V)
    if name in ("interleaved", "interleaved-zb"):
        interleaved_round(K, M)  # refuses an M the rounds cannot split, naming valid ones
    if name == "gpipe":
        return _gpipe_peaks(K, M, V, full)
    split = name in SPLIT_BACKWARD
    walked = _compute_actions(name, K, _walked_microbatches(name, K, M, V), V)
    place = named_placement(name, K, V)
    return tuple(_walk(walked[rank], rank, K, V, split, full, place) for rank in range(K))


def _gpipe_peaks(K: int, M: int, V: int, full: bool) -> tuple:
    """GPipe holds all M micro-batches at its peak: M times what one micro-batch holds.

    Its peaks are after the last forward and at each chunk's first backward, where every
    micro-batch is alike, so the held counts scale with M (the transient ones do not). The
    buffer and micro-batch counts grow by one step per micro-batch from M = 2 on (at M = 1 the
    first rank's early-posted backward receive has no forward to hide behind).
    """
    if M <= 3:
        actions = _compute_actions("gpipe", K, M, V)
        return tuple(_walk(actions[rank], rank, K, V, False, full) for rank in range(K))
    walks = {m: _compute_actions("gpipe", K, m, V) for m in (1, 2, 3)}
    peaks = []
    for rank in range(K):
        at = {m: _walk(walks[m][rank], rank, K, V, False, full) for m in walks}
        held = np.tile(_HELD, V)
        candidates = at[1].candidates * np.where(held, M, 1)
        buffers = _extrapolated(at[2].comm_buffers, at[3].comm_buffers, M)
        most = _extrapolated(at[2].peak_microbatches, at[3].peak_microbatches, M)
        peaks.append(RankPeaks(_distinct_peaks(candidates), buffers, most))
    return tuple(peaks)


def _extrapolated(at_2: int, at_3: int, M: int) -> int:
    """The line through (2, at_2) and (3, at_3) at M."""
    return at_3 + (M - 3) * (at_3 - at_2)


def _walk(
    actions: Sequence[Action], rank: int, K: int, V: int, split: bool, full: bool, place=None
):
    """RankPeaks of one rank's actions (their compute ones; lowering's receives implied).

    place: the schedule's placement (None: round robin). Stage s's chunk on its rank is s // K
    in both placements (the V shape's rank r holds r and 2K - 1 - r).
    """
    compute = [a for a in actions if a.is_compute]
    mine = stages_of(place or loop_placement(K, V), rank)
    if K == 1 or _has_neighbours(mine):  # a shared edge buffer: walk item by item
        moments = _shared_edge_moments(compute, K, V, split, full)
        buffers = _remote_receive_peak(compute, set(mine), K * V, split)
        return RankPeaks(moments, buffers, _most_held(compute, split))
    return _walk_by_counts(compute, rank, K, V, split, full)


def _has_neighbours(stages: Sequence[int]) -> bool:
    """Whether two consecutive stages live on this rank (the V shape's turn)."""
    held = set(stages)
    return any(s + 1 in held for s in held)


def _remote_receive_peak(compute, mine: set[int], num_stages: int, split: bool) -> int:
    """_receive_peak where some neighbours are local (they send nothing): lowering posts the
    receive of compute action i just before action i - 1 and the micro-batch gives its
    receives back when it is done here (B, or W under a split backward)."""
    done = Kind.W if split else Kind.B
    posted = returned = peak = 0
    given_back = []
    for i, a in enumerate(compute):
        remote_before = a.stage > 0 and a.stage - 1 not in mine
        remote_after = a.stage < num_stages - 1 and a.stage + 1 not in mine
        posted += remote_before if a.kind == Kind.F else remote_after and a.kind != Kind.W
        returned += given_back[i - 2] if i >= 2 else 0  # actions 0 .. i-2 have run
        peak = max(peak, posted - returned)
        given_back.append(remote_before + remote_after if a.kind == done else 0)
    return peak


def _walk_by_counts(compute, rank: int, K: int, V: int, split: bool, full: bool) -> RankPeaks:
    """peak_activation_bytes', predict_comm's and peak_microbatches' rules as running sums.

    With K > 1 no two stages of a rank are neighbours, so every F acquires new items and each
    action changes the counts by an amount that depends only on its kind and chunk: the counts
    after action j are a cumulative sum.
    """
    kinds = np.array([_KIND_CODE[a.kind] for a in compute], dtype=np.int64)
    chunks = np.array([a.stage // K for a in compute], dtype=np.int64)
    deltas = _deltas(V, split, full)[kinds, chunks]  # (actions, PARTS * V)
    counts = np.cumsum(deltas, axis=0)
    acquiring = kinds == _F if not split else kinds != _W  # a split B acquires the deferred part
    moments = [counts[acquiring]]
    if full:  # B rebuilds its chunk's forward for the moment, before it changes any count
        before = np.vstack([np.zeros((1, counts.shape[1]), np.int64), counts[:-1]])
        backward = kinds == _B
        spike = np.zeros_like(counts[backward])
        columns = PARTS * chunks[backward]
        rows = np.arange(len(columns))
        spike[rows, columns + TRANSIENT_BODY] = spike[rows, columns + TRANSIENT_OUTPUT] = 1
        moments.append(before[backward] + spike)
    candidates = _distinct_peaks(np.vstack(moments))
    stages = np.array([a.stage for a in compute], dtype=np.int64)
    buffers = _receive_peak(kinds, stages, K * V, split)
    return RankPeaks(candidates, buffers, _most_held(compute, split))


_F, _B, _W = 0, 1, 2
_KIND_CODE = {Kind.F: _F, Kind.B: _B, Kind.I: _B, Kind.W: _W}  # `split` tells B from I


@functools.lru_cache(maxsize=64)
def _deltas(V: int, split: bool, full: bool) -> np.ndarray:
    """deltas[kind, chunk]: how an action changes the held counts (K > 1)."""
    table = np.zeros((3, V, PARTS * V), dtype=np.int64)
    for c in range(V):
        f, b, w = table[_F, c], table[_B, c], table[_W, c]
        base = PARTS * c
        f[base + INPUT] += 1
        if not full:  # full recomputation keeps only the input until B
            f[base + BODY] += 1
            f[base + OUTPUT] += 1
            b[base + BODY] -= 1
            b[base + OUTPUT] -= 1
        if split:
            b[base + DEFERRED] += 1
            w[base + DEFERRED] -= 1
            w[base + INPUT] -= 1
        else:
            b[base + INPUT] -= 1
    table.setflags(write=False)
    return table


def _receive_peak(kinds: np.ndarray, stages: np.ndarray, num_stages: int, split: bool) -> int:
    """predict_comm's count with lowering's placement (K > 1): the receive of compute action
    i is posted just before action i - 1 (the first before all); an action's micro-batch
    gives back both its receives when it is done here (B, or W under a split backward)."""
    from_before = (kinds == _F) & (stages > 0)  # every neighbour is remote
    from_after = (kinds == _B) & (stages < num_stages - 1)
    posted = np.cumsum(from_before | from_after)
    ends = kinds == (_W if split else _B)
    given_back = np.where(ends, (stages > 0).astype(np.int64) + (stages < num_stages - 1), 0)
    # when receive i is posted, actions 0 .. i-2 have run
    returned = np.concatenate([[0, 0], np.cumsum(given_back)])[: len(kinds)]
    return int(max(0, (posted - returned).max(initial=0)))


def _most_held(compute: Sequence[Action], split: bool) -> int:
    """schedule.peak_microbatches: held from F until W (or B without a split backward)."""
    ends = Kind.W if split else Kind.B
    steps = [1 if a.kind == Kind.F else -1 if a.kind == ends else 0 for a in compute]
    return int(max(0, np.cumsum(steps).max(initial=0)))


def _shared_edge_moments(compute, K: int, V: int, split: bool, full: bool) -> np.ndarray:
    """peak_activation_bytes' walk on one rank holding neighbouring stages (K = 1, or the
    V shape's turn), on counts; stage s counts in its chunk's columns, s // K.

    A stage's output and the next stage's input are one buffer, counted under whoever
    acquired it first (as the output, unless full recomputation left the output out).
    """
    counts = [0] * (PARTS * V)
    refs: dict[tuple, list[int]] = {}
    moments: list[tuple[int, ...]] = []

    def acquire(key, variable: int) -> None:
        if key in refs:
            refs[key][0] += 1
            return
        refs[key] = [1, variable]
        counts[variable] += 1
        moments.append(tuple(counts))

    def release(key) -> None:
        entry = refs.get(key)
        if entry is not None:
            entry[0] -= 1
            if entry[0] == 0:
                del refs[key]
                counts[entry[1]] -= 1

    for a in compute:
        s, m, base = a.stage, a.microbatch, PARTS * (a.stage // K)
        edge_in, edge_out = ("edge", s, m), ("edge", s + 1, m)
        if a.kind == Kind.F:
            acquire(edge_in, base + INPUT)
            if not full:
                acquire(("body", s, m), base + BODY)
                acquire(edge_out, base + OUTPUT)
        elif a.kind in (Kind.B, Kind.I):
            if full:
                spike = list(counts)
                spike[base + TRANSIENT_BODY] += 1
                spike[base + TRANSIENT_OUTPUT] += 1
                moments.append(tuple(spike))
            else:
                release(("body", s, m))
                release(edge_out)
            if split:
                acquire(("deferred", s, m), base + DEFERRED)
            else:
                release(edge_in)
        else:  # W
            release(("deferred", s, m))
            release(edge_in)
    return _distinct_peaks(np.array(moments, dtype=np.int64).reshape(-1, PARTS * V))


def _distinct_peaks(rows: np.ndarray) -> np.ndarray:
    """The distinct rows, less those the next row is at least as large as in every entry.

    Any row another one dominates can never be the peak; comparing each with its successor
    (usually the next moment) removes most of them for the price of one pass. A full Pareto
    front would be smaller still but costs more than it saves: layouts evaluate a few
    thousand rows as one matrix product.
    """
    if len(rows) > 1:
        below_next = (rows[:-1] <= rows[1:]).all(axis=1)
        rows = rows[np.append(~below_next, True)]
    # distinct by their bytes: a dict keeps the order and is much faster than np.unique(axis=0)
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    blob, step = rows.tobytes(), rows.shape[1] * rows.itemsize
    distinct = dict.fromkeys(blob[i : i + step] for i in range(0, len(blob), step))
    return np.frombuffer(b"".join(distinct), dtype=np.int64).reshape(-1, rows.shape[1])


# ---------------------------------------------------------------- a layout


def _dtype(dtype) -> torch.dtype:
    return TORCH_DTYPES[dtype] if isinstance(dtype, str) else dtype


def stage_ranges(partition: Sequence[int], num_stages: int, num_layers: int) -> list[range]:
    """Layer ranges of the stages from per-stage layer counts (ValueError when they don't fit)."""
    counts = list(partition)
    if len(counts) != num_stages or any(c < 1 for c in counts) or sum(counts) != num_layers:
        raise ValueError(
            f"partition {counts} must give {num_stages} positive layer counts (pp x virtual) "
            f"summing to the model's {num_layers} layers"
        )
    starts = [sum(counts[:s]) for s in range(num_stages)]
    return [range(start, start + c) for start, c in zip(starts, counts, strict=True)]


def layout_memory(
    spec: api.ModelSpec,
    model_config,
    *,
    dtype: torch.dtype | str,
    dp: int,
    pp: int,
    tp: int,
    virtual: int,
    microbatches: int,
    microbatch_size: int,
    schedule_name: str,
    recompute: str | bool,
    zero: int,
    partition: Sequence[int],
    device: torch.device | str = "cpu",
) -> list[dict]:
    """Predicted bytes of each pipeline rank of a layout, as predict_rank gives them.

    One dict per pp rank: "pp_rank", "params", "grads", "optimizer" (predict_static of the
    rank's parameters on one tp rank), "activations" (the schedule's peak), "comm" (receive
    buffers), "total" (their sum) and "peak_microbatches". partition: layer counts of the
    pp * virtual stages. Raises ValueError (ScheduleError, TensorParallelError) for a layout
    that cannot run: a bad partition, a schedule refusing (pp, microbatches, virtual), a tp
    degree the model's shapes do not divide.
    """
    dtype = _dtype(dtype)
    mode = recompute_mode(recompute)
    split = schedule_name in SPLIT_BACKWARD
    stages = stage_ranges(partition, pp * virtual, spec.num_layers(model_config))
    peaks = schedule_peaks(schedule_name, pp, microbatches, virtual, mode == "full")
    element = torch.empty((), dtype=dtype).element_size()
    boundary = math.prod(spec.boundary_shape(model_config, microbatch_size)) * element
    trace = {"dtype": dtype, "recompute": mode, "split_backward": split, "tp": tp, "device": device}
    ranks = []
    for rank in range(pp):
        own = [stages[s] for s in stages_of(named_placement(schedule_name, pp, virtual), rank)]
        chunk_bytes = [
            stage_activation_bytes(spec, model_config, layers, microbatch_size, **trace)
            for layers in own
        ]
        numel = sum(stage_param_numel(spec, model_config, layers, tp) for layers in own)
        static = predict_static(numel, dtype, zero, dp)
        activations = peaks[rank].activation_bytes(chunk_bytes)
        comm = peaks[rank].comm_buffers * boundary
        ranks.append(
            {
                "pp_rank": rank,
                **static,
                "activations": activations,
                "comm": comm,
                "total": sum(static.values()) + activations + comm,
                "peak_microbatches": peaks[rank].peak_microbatches,
            }
        )
    return ranks
