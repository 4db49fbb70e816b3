"""`hpcpipe plan --profile OUT.json`: time this machine's layers, links and optimizer.

The planner predicts a layout's step time from what this module measures, so everything is
timed through the code training runs, not through stand-ins:

- layers: the PipelineRuntime's own F, B and W handlers (its trace times them) on one layer
  built, tensor-parallelized, selectively recomputed or split for a zero-bubble backward
  exactly as the trainer builds a stage; the last layer's times include the loss;
- contention: the whole model in that runtime on 1..N processes at once (how fast each runs
  when cores are shared);
- point-to-point: P2P's sends, receives and polite waits (a ping-pong, and messages to a rank
  that has been waiting for them, as a pipeline's fill and drain send them);
- all-reduce: the GradReducer's bucket reduction (data parallelism) and allreduce_ (tensor
  parallelism, the trainer's per-step sums);
- optimizer: MasterOptimizer's step (squared norm, clipping, AdamW over the fragments).

The process keeps the memory it frees (plan/allocator.py), as a training process in its steady
state does: otherwise every timing iteration would fault its activations in again.

Only the ranks being timed compute; the others wait in a barrier that sleeps between polls,
because a blocking MPI wait spins a core, and on a machine whose ranks share cores that spinning
would slow the ranks being timed (../shared/FIELD-NOTES.md).

`load_profile` reads the file back as a `Profile`, whose helpers answer the time model's
questions (a layer's time at any micro-batch size, the speed of n busy processes, a message, a
reduction); `groups_of` says which measured layer group each layer of a model belongs to.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from hpcpipe.config import TORCH_DTYPES, ConfigError
from hpcpipe.models import get_spec
from hpcpipe.models.api import SELECTIVE_RECOMPUTE, check_boundaries
from hpcpipe.plan.allocator import keep_freed_memory

KIND = "hpcpipe-profile"
VERSION = 1
LAYER_KINDS = ("f", "b", "w", "bw")
RECOMPUTE_ROWS = ("false", "selective")
FULL_RECOMPUTE = (
    "full recomputation is not a row: the runtime runs its F without a graph and its B as "
    "forward + backward, so B = f + bw (split: f + b) and W = w; full_recompute_check holds "
    "one measurement of it"
)

WARMUPS = 2  # untimed iterations before each measured point
SLOW_ITERATION_S = 0.25  # an iteration this slow warms up once: its allocations are made
POINT_BUDGET_S = 1.0  # a point slower than this in all is timed fewer times (at least 3)
FAST_POINT_S = 0.25  # one faster than this takes up to 3x the repeats (see repeat_count)
CONTENTION_WINDOW_S = 1.5  # seconds (at least) each count of busy processes runs the loop...
CONTENTION_ROUNDS = 3  # ...in each of these rounds over 1..N (the median per count is kept)
CONTENTION_ITERATIONS = 4  # ...and at least this many solo iterations' worth of time
# the loop runs at the sizes whose whole-model F + BW is nearest each of these: the sizes
# training steps use (a few to several sequences per micro-batch), not only the smallest
CONTENTION_TARGETS_S = (0.1, 0.25, 0.5)
PING_PONG_ROUNDS = 16
# how long a rank waits for a message before its sender sends, in the ping-pong to a waiting
# rank: long past P2P's spin, so the wait has backed off to 1 ms sleeps, as a pipeline rank's
# does in the fill and drain (its peers compute for tens to hundreds of ms)
WAITING_IDLE_S = 0.02
COLLECTIVE_REPEATS = 8


# ============================================================================================
# The file: Profile, load_profile, groups_of
# ============================================================================================


@dataclass(frozen=True)
class Profile:
    """A profile read back (see load_profile); seconds and bytes throughout."""

    path: str
    world_size: int
    threads: int
    dtype: str
    machine: dict
    model: dict
    layers: tuple  # the rows of "layers"
    contention: tuple  # speed of each process with n = 1, 2, ... N busy at once
    p2p: dict
    allreduce: dict  # group size (a string, as in JSON) -> fit
    optimizer: dict
    groups: tuple = ()  # {"group", "indices", "signature", ...} of the profiled model
    raw: dict = field(repr=False, compare=False, default_factory=dict)
    rows: dict = field(repr=False, compare=False, default_factory=dict)  # see _index_layers
    fits: dict = field(repr=False, compare=False, default_factory=dict)  # per_sequence_fit's

    def layer_time(
        self, group: int, tp: int, microbatch_size: float, kind: str, recompute: str = "false"
    ) -> float:
        """Seconds of one micro-batch of `kind` (f, b, w, bw) through one layer of `group`.

        A fixed part plus a part per sequence, fitted robustly to the measured sizes
        (per_sequence_fit). recompute "selective" falls back to the plain rows for a group
        without an attention core (its times do not change); full recomputation is derived
        by the caller (FULL_RECOMPUTE). Measured with `tp` processes busy at once.
        """
        if kind not in LAYER_KINDS:
            raise ValueError(f"layer time kind {kind!r} is not one of {', '.join(LAYER_KINDS)}")
        if recompute not in RECOMPUTE_ROWS:
            raise ValueError(
                f"recompute {recompute!r} is not one of {', '.join(RECOMPUTE_ROWS)}; "
                f"{FULL_RECOMPUTE}"
            )
        rows = (
            (group, tp, recompute) if (group, tp, recompute) in self.rows else (group, tp, "false")
        )
        points = self.rows.get(rows)
        if not points:
            measured = sorted({(g, t) for g, t, _ in self.rows})
            raise ValueError(
                f"{self.path}: no layer times for group {group} at tp={tp}; measured "
                f"(group, tp): {measured}; profile again with that tp degree"
            )
        key = (*rows, kind)
        if key not in self.fits:
            self.fits[key] = per_sequence_fit([(m, row[kind]) for m, row in points])
        fixed, per_sequence = self.fits[key]
        return max(0.0, fixed + per_sequence * microbatch_size)

    def speed(self, n: int) -> float:
        """Speed of each of n busy processes relative to one alone (1.0 for n = 1).

        Beyond the measured counts the cores are taken as saturated: speed[-1] * N / n.
        """
        if n < 1:
            raise ValueError(f"speed needs at least one busy process (got {n})")
        speeds = self.contention
        if n <= len(speeds):
            return float(speeds[n - 1])
        return float(speeds[-1]) * len(speeds) / n

    def p2p_time(self, nbytes: float, to_waiting: bool = False) -> float:
        """One-way seconds of a pipeline message of `nbytes` (half a measured round trip);
        to_waiting: to a rank that has been waiting for it (`p2p.to_waiting`, where the
        profile measured it; an older profile's ping-pong otherwise)."""
        fit = self.p2p.get("to_waiting", self.p2p) if to_waiting else self.p2p
        return alpha_beta(fit, nbytes)

    def allreduce_time(self, group_size: int, nbytes: float, path: str = "grad_reducer") -> float:
        """Seconds of an all-reduce of `nbytes` over `group_size` processes.

        path "grad_reducer": data parallelism's bucket reduction (the top-level fit);
        "allreduce_": hpcpipe's plain sum (tensor parallelism, the per-step totals). A group
        size that was not measured scales the nearest measured one as a ring does: latency
        by its n - 1 steps, the bytes term by 2 (n - 1) / n.
        """
        if group_size <= 1:
            return 0.0
        if path not in ("grad_reducer", "allreduce_"):
            raise ValueError(f"all-reduce path {path!r} is not grad_reducer or allreduce_")
        nearest = min((int(k) for k in self.allreduce), key=lambda m: (abs(m - group_size), -m))
        fit = self.allreduce[str(nearest)]
        fit = fit if path == "grad_reducer" else fit["allreduce_"]
        steps = (group_size - 1) / (nearest - 1)
        ring = ((group_size - 1) / group_size) / ((nearest - 1) / nearest)
        return fit["latency_s"] * steps + nbytes / fit["bytes_per_s"] * ring


def per_sequence_fit(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """(fixed, per_sequence): the line t(m) = fixed + per_sequence * m through measured
    (micro-batch size, seconds) points, fitted robustly.

    Each row of a profile is one short median on a machine whose speed wanders, and one row
    can be off by itself: in one profile the block at 8 sequences came out 25 % slower per
    sequence than its neighbours at 4 and 16, while training at 8 ran faster than at 4. A
    layer's time is a fixed cost per call plus work per sequence, so the planner reads the
    rows through that line, fitted by Theil-Sen (the median of the pairwise slopes, which one
    bad point of six cannot move far) to the time per sequence against 1/m, where every
    size's relative error weighs alike. One point: time in proportion to m; two: the line
    through both.
    """
    if len(points) == 1:
        size, seconds = points[0]
        return 0.0, seconds / size
    per_seq = [(1 / m, t / m) for m, t in points]  # t/m = per_sequence + fixed * (1/m)
    slopes = [
        (y1 - y0) / (x1 - x0)
        for i, (x0, y0) in enumerate(per_seq)
        for x1, y1 in per_seq[i + 1 :]
        if x1 != x0
    ]
    fixed = statistics.median(slopes) if slopes else 0.0
    return fixed, statistics.median(y - fixed * x for x, y in per_seq)


def alpha_beta(fit: dict, nbytes: float) -> float:
    """latency + bytes / bandwidth."""
    return fit["latency_s"] + nbytes / fit["bytes_per_s"]


def fit_alpha_beta(points: Sequence[tuple[float, float]]) -> dict:
    """Least-squares latency and bandwidth through (bytes, seconds) points.

    Relative errors are minimized (each row divided by its time), so an 8-byte message's
    latency counts as much as a 20 MB one's bandwidth. Both stay positive, so the fit grows
    with the size: a negative intercept refits through the origin, a non-positive slope
    takes the largest message's.
    """
    import numpy as np

    n = np.array([p[0] for p in points], dtype=float)
    t = np.array([max(p[1], 1e-12) for p in points], dtype=float)
    rows = np.stack([1.0 / t, n / t], axis=1)
    (latency, per_byte), *_ = np.linalg.lstsq(rows, np.ones_like(t), rcond=None)
    if latency < 0:
        latency, per_byte = 0.0, float(np.sum(n / t) / np.sum((n / t) ** 2))
    if per_byte <= 0:
        largest = int(np.argmax(n))
        latency = float(t.min())
        per_byte = max(t[largest] - latency, 1e-12) / max(n[largest], 1.0)
    return {"latency_s": float(latency), "bytes_per_s": float(1.0 / per_byte)}


def layer_signature(layer: nn.Module) -> str:
    """Class and parameter/buffer shapes: layers with equal signatures take equal times."""
    kind = f"{type(layer).__module__}.{type(layer).__qualname__}"
    tensors = [*layer.named_parameters(), *layer.named_buffers()]
    return kind + "(" + ", ".join(f"{n}{list(t.shape)}" for n, t in tensors) + ")"


def layer_groups(spec, model) -> list[dict]:
    """[{"group", "indices", "signature", "params", "attention_core"}] in order of first
    appearance; attention_core: whether selective recomputation changes the layer's times.

    Built on the meta device: no memory, no initialisation.
    """
    groups: dict[str, dict] = {}
    with torch.device("meta"):
        for index in range(spec.num_layers(model)):
            layer = spec.build_layer(model, index)
            signature = layer_signature(layer)
            if signature not in groups:
                groups[signature] = {
                    "group": len(groups),
                    "indices": [],
                    "signature": signature,
                    "params": sum(p.numel() for p in layer.parameters()),
                    "attention_core": any(hasattr(m, SELECTIVE_RECOMPUTE) for m in layer.modules()),
                }
            groups[signature]["indices"].append(index)
    return list(groups.values())


def groups_of(spec, config, profile: Profile | None = None) -> dict[int, int]:
    """{layer index: group} of a model (config: its [model] config or a whole Config).

    Groups are numbered in order of first appearance, so the same family with another
    n_layers keeps its profile's numbering (GPT-2: embedding 0, blocks 1, head 2). With a
    profile, each layer is matched to the measured group of its signature (class and shapes),
    and a layer the profile never timed is a ValueError: its times would be another layer's.
    """
    groups = layer_groups(spec, getattr(config, "model", config))
    if profile is None:
        return {i: g["group"] for g in groups for i in g["indices"]}
    measured = {g["signature"]: g["group"] for g in profile.groups}
    unknown = [g for g in groups if g["signature"] not in measured]
    if unknown:
        layers = "; ".join(f"layers {g['indices']}: {g['signature']}" for g in unknown)
        raise ValueError(
            f"{profile.path}: the profile timed other layers than this model has ({layers}); "
            "profile this model (same [model] keys; n_layers may differ)"
        )
    return {i: measured[g["signature"]] for g in groups for i in g["indices"]}


_REQUIRED = (
    "world_size", "threads", "dtype", "machine", "model", "layers", "contention", "p2p",
    "allreduce", "optimizer",
)  # fmt: skip


def load_profile(path: str | Path) -> Profile:
    """Read a profile that run_profile wrote; ValueError naming the file and the fault."""
    path = str(path)
    return profile_from_data(path, _read_json(path))


def profile_from_data(path: str, data) -> Profile:
    """A Profile from a profile's JSON object (read from `path`, or merged from several)."""
    _require(
        path,
        isinstance(data, dict) and data.get("kind") == KIND,
        f'not an hpcpipe profile (expected "kind": "{KIND}"); write one with '
        f"`mpiexec -n N hpcpipe plan --profile {path}`",
    )
    _require(
        path,
        data.get("version") == VERSION,
        f"profile version {data.get('version')!r} is not supported (this hpcpipe reads "
        f"version {VERSION}); profile again",
    )
    missing = [key for key in _REQUIRED if key not in data]
    _require(path, not missing, f"the profile lacks {', '.join(missing)}")
    _check_fit(path, "p2p", data["p2p"])
    if "to_waiting" in data["p2p"]:
        _check_fit(path, "p2p.to_waiting", data["p2p"]["to_waiting"])
    optimizer = data["optimizer"]
    _require(path, isinstance(optimizer, dict), "optimizer must be an object")
    _check_number(path, "optimizer.seconds_per_param", optimizer.get("seconds_per_param"))
    return Profile(
        path=path,
        world_size=int(data["world_size"]),
        threads=int(data["threads"]),
        dtype=str(data["dtype"]),
        machine=dict(data["machine"]),
        model=dict(data["model"]),
        layers=tuple(data["layers"]),
        contention=_check_speeds(path, data["contention"]),
        p2p=dict(data["p2p"]),
        allreduce=_check_allreduce(path, data["allreduce"]),
        optimizer=dict(optimizer),
        groups=tuple(data.get("groups", ())),
        raw=data,
        rows=_index_layers(path, data["layers"]),
    )


def _read_json(path: str):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(
            f"{path}: no such profile; write one with `hpcpipe plan --profile`"
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not an hpcpipe profile (not JSON: {exc})") from None


def _require(path: str, ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"{path}: {message}")


def _check_number(path: str, where: str, value, positive: bool = False) -> float:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    ok = number and math.isfinite(value) and (value > 0 if positive else value >= 0)
    sign = "positive" if positive else "non-negative"
    _require(path, ok, f"{where} must be a {sign} number, got {value!r}")
    return float(value)


def _check_int(path: str, where: str, value, low: int) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    _require(path, ok, f"{where} must be an integer >= {low}, got {value!r}")
    return value


def _index_layers(path: str, layers) -> dict:
    """{(group, tp, recompute): [(microbatch_size, row)] by size} of the checked rows."""
    _require(path, isinstance(layers, list) and bool(layers), '"layers" must be a non-empty list')
    index: dict[tuple, list] = {}
    for i, row in enumerate(layers):
        where = f"layers[{i}]"
        _require(path, isinstance(row, dict), f"{where} must be an object")
        group = _check_int(path, f"{where}.group", row.get("group"), 0)
        tp = _check_int(path, f"{where}.tp", row.get("tp"), 1)
        size = _check_int(path, f"{where}.microbatch_size", row.get("microbatch_size"), 1)
        recompute = row.get("recompute", "false")
        _require(
            path,
            recompute in RECOMPUTE_ROWS,
            f"{where}.recompute must be one of {', '.join(RECOMPUTE_ROWS)}, got {recompute!r}",
        )
        for kind in LAYER_KINDS:
            _check_number(path, f"{where}.{kind}", row.get(kind))
        index.setdefault((group, tp, recompute), []).append((size, row))
    for key, points in index.items():
        points.sort(key=lambda p: p[0])
        sizes = [m for m, _ in points]
        _require(
            path,
            len(set(sizes)) == len(sizes),
            f"the layer rows of (group, tp, recompute) = {key} repeat a micro-batch size: {sizes}",
        )
    return index


def _check_speeds(path: str, contention) -> tuple:
    speeds = contention.get("speed") if isinstance(contention, dict) else None
    _require(
        path, isinstance(speeds, list) and bool(speeds), "contention.speed must be a non-empty list"
    )
    return tuple(
        _check_number(path, f"contention.speed[{i}]", s, positive=True)
        for i, s in enumerate(speeds)
    )


def _check_fit(path: str, where: str, fit) -> None:
    _require(path, isinstance(fit, dict), f"{where} must be an object")
    _check_number(path, f"{where}.latency_s", fit.get("latency_s"))
    _check_number(path, f"{where}.bytes_per_s", fit.get("bytes_per_s"), positive=True)


def _check_allreduce(path: str, allreduce) -> dict:
    _require(
        path,
        isinstance(allreduce, dict) and bool(allreduce),
        'allreduce must map group sizes ("2", "4", ...) to fits',
    )
    for size, fit in allreduce.items():
        _require(
            path,
            size.isdigit() and int(size) >= 2,
            f"allreduce keys are group sizes >= 2, got {size!r}",
        )
        _check_fit(path, f"allreduce.{size}", fit)
        if "allreduce_" in fit:
            _check_fit(path, f"allreduce.{size}.allreduce_", fit["allreduce_"])
    return dict(allreduce)


# ============================================================================================
# Measuring
# ============================================================================================


def default_microbatch_sizes(config) -> list[int]:
    """Every micro-batch size a layout can give this global batch: its divisors."""
    batch = config.train.global_batch
    return [d for d in range(1, batch + 1) if batch % d == 0]


def default_tp_degrees(spec, model, world_size: int) -> list[int]:
    """1 and the divisors of the world size that the family's tensor-parallel plan accepts."""
    plan = spec.tp_plan()
    return [1] + [
        tp for tp in range(2, world_size + 1) if world_size % tp == 0 and _splits(plan, model, tp)
    ]


def _splits(plan, model, tp: int) -> bool:
    if plan is None:
        return False
    try:
        plan.check(model, tp)
    except ValueError:
        return False
    return True


def check_request(config, world_size: int, microbatch_sizes, tp_degrees, repeats: int) -> None:
    """Refuse what cannot be profiled (ConfigError): the same verdict on every rank."""
    if world_size < 2:
        raise ConfigError(
            "a profile times messages and reductions between processes: run it under mpiexec "
            "with at least 2 ranks (as many as the layouts you will plan use)"
        )
    if config.train.device == "cuda":
        raise ConfigError("the profile times CPU processes; train.device=cuda is not profiled")
    if repeats < 1:
        raise ConfigError(f"repeats must be >= 1 (got {repeats})")
    if not microbatch_sizes or min(microbatch_sizes) < 1:
        raise ConfigError(f"micro-batch sizes must be >= 1 (got {list(microbatch_sizes)})")
    spec = get_spec(config.model.arch)
    for tp in tp_degrees:
        if not 1 <= tp <= world_size:
            raise ConfigError(f"tp degree {tp} needs 1..{world_size} ranks (the world size)")
        if tp > 1 and not _splits(spec.tp_plan(), config.model, tp):
            raise ConfigError(
                f"model.arch={spec.name!r} cannot be split tp={tp} ways (its tensor-parallel "
                "plan refuses the shapes, or it has none); leave that tp degree out"
            )
    try:
        check_boundaries(spec, config.model, 1)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def run_profile(
    config,
    out_path: str | Path,
    comm,
    *,
    microbatch_sizes: Sequence[int] | None = None,
    tp_degrees: Sequence[int] | None = None,
    repeats: int = 5,
    log: Callable[[str], None] | None = None,
) -> dict | None:
    """Profile this machine on every rank of `comm` (collective); rank 0 writes out_path.

    microbatch_sizes: default the divisors of train.global_batch; tp_degrees: default 1 and
    the divisors of the world size the family's plan accepts; repeats: timed iterations per
    point after 2 warm-ups, whose median is kept (repeat_count: fewer for slow points, more
    for very fast ones); log: rank 0's progress lines (default: stderr).

    Raises ConfigError, before any communication, for what cannot be profiled. Returns the
    profile's dict on rank 0, None elsewhere.
    """
    spec, model = get_spec(config.model.arch), config.model
    world = comm.Get_size()
    sizes = sorted(set(microbatch_sizes or default_microbatch_sizes(config)))
    tps = sorted(set(tp_degrees or default_tp_degrees(spec, model, world)))
    check_request(config, world, sizes, tps, repeats)
    torch.set_num_threads(config.train.threads)
    # NOTE: before the first timing loop: with glibc's defaults every iteration faults its
    # freed activations in again, which a settled training step does not (plan/allocator.py)
    kept = keep_freed_memory()
    ctx = _Context(config, spec, model, comm, TORCH_DTYPES[config.train.dtype], repeats)
    say = (log or _stderr) if ctx.rank == 0 else (lambda message: None)
    begin = time.perf_counter()
    profile = _header(ctx, sizes, tps)
    profile["machine"]["freed_memory_kept"] = kept
    _warn_if_busy(profile["machine"], say)
    phases = {
        "layers": lambda: {"layers": _measure_layers(ctx, sizes, tps, say)},
        "full_recompute_check": lambda: _measure_full_recompute(ctx, sizes),
        "contention": lambda: {"contention": _measure_contention(ctx, profile)},
        "p2p": lambda: {"p2p": _measure_p2p(ctx, sizes)},
        "allreduce": lambda: {"allreduce": _measure_allreduce(ctx)},
        "optimizer": lambda: {"optimizer": _measure_optimizer(ctx)},
    }
    seconds = {}
    for name, phase in phases.items():
        start = time.perf_counter()
        profile.update(phase())
        seconds[name] = round(time.perf_counter() - start, 2)
        say(f"hpcpipe profile: {name}: {seconds[name]:.1f} s")
    seconds["total"] = round(time.perf_counter() - begin, 2)
    profile["seconds"] = seconds
    profile["machine"]["load_average_end"] = os.getloadavg()[0]
    if ctx.rank != 0:
        return None
    _write_atomically(Path(out_path), profile)
    say(f"hpcpipe profile: wrote {out_path} ({seconds['total']:.1f} s)")
    return profile


@dataclass
class _Context:
    """What every phase needs: the run's model and dtype, the world and its polite waits."""

    config: object
    spec: object
    model: object
    comm: object
    dtype: torch.dtype
    repeats: int

    def __post_init__(self):
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.timeout = self.config.parallel.timeout

    def barrier(self, comm=None) -> None:
        """All of `comm` (default the world) arrive; the early ones sleep while they wait."""
        polite_barrier(comm or self.comm, self.timeout)

    def first_ranks(self, size: int):
        """A communicator of world ranks 0..size-1 (None on the others): who gets timed."""
        from mpi4py import MPI

        sub = self.comm.Split(0 if self.rank < size else MPI.UNDEFINED, self.rank)
        return None if sub == MPI.COMM_NULL else sub


def polite_barrier(comm, timeout: float) -> None:
    """MPI barrier that sleeps between polls instead of spinning a core (p2p.wait_politely)."""
    from hpcpipe.parallel.p2p import wait_politely

    wait_politely(
        comm.Ibarrier(),
        time.monotonic() + timeout,
        lambda: (
            f"a profiling barrier over {comm.Get_size()} ranks did not finish within "
            f"{timeout:.0f} s; a rank is stuck or dead"
        ),
    )


def _group_max(comm, values: Sequence[float], timeout: float) -> list[float]:
    """Element-wise maximum over `comm`: a group is as slow as its slowest rank."""
    from mpi4py import MPI

    from hpcpipe.parallel.p2p import allreduce_

    tensor = torch.tensor(list(values), dtype=torch.float64)
    allreduce_(comm, tensor, op=MPI.MAX, timeout=timeout)
    return tensor.tolist()


def _header(ctx: _Context, sizes, tps) -> dict:
    return {
        "kind": KIND,
        "version": VERSION,
        "machine": machine_info(),
        "world_size": ctx.size,
        "threads": ctx.config.train.threads,
        "dtype": ctx.config.train.dtype,
        "model": dataclasses.asdict(ctx.model),
        "microbatch_sizes": list(sizes),
        "tp_degrees": list(tps),
        "repeats": ctx.repeats,
        "groups": layer_groups(ctx.spec, ctx.model),
        "full_recompute": FULL_RECOMPUTE,
    }


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def machine_info() -> dict:
    """Where the profile ran: host, CPU, cores this process may use, memory, versions."""
    from mpi4py import MPI

    return {
        "hostname": socket.gethostname(),
        "cpu": _cpu_model(),
        "cores": len(os.sched_getaffinity(0)),
        "device": "cpu",
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "load_average_start": os.getloadavg()[0],  # other jobs' load (1 minute)
        "torch": torch.__version__,
        "mpi": MPI.Get_library_version().replace("\x00", "").strip().splitlines()[0].strip(),
    }


def _warn_if_busy(machine: dict, say) -> None:
    """Other jobs' load makes every time of the profile theirs too: say so (it is recorded).

    NOTE: the ranks' own start-up (importing torch) adds about 0.6 to the 1-minute average
    on 4 ranks, hence the margin.
    """
    load, cores = machine["load_average_start"], machine["cores"]
    if load > 0.75 * cores:
        say(
            f"hpcpipe profile: warning: the machine is busy (load average {load:.1f} on "
            f"{cores} cores): the times will be those of a busy machine; profile when it is idle"
        )


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _write_atomically(path: Path, profile: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(profile, indent=1) + "\n")
    tmp.replace(path)


def solo_tp(ctx: _Context):
    """The tensor-parallel context of a layer this process runs by itself (tp = 1)."""
    from hpcpipe.parallel.tensor_parallel import TPContext

    return TPContext(None, 0, 1, ctx.timeout)


def _most_frequent(groups: list[dict]) -> dict:
    """The group with the most layers (a transformer's blocks)."""
    return max(groups, key=lambda g: len(g["indices"]))


# --- one layer in the runtime ---------------------------------------------------------------


class _Feeder(nn.Module):
    """Stage before the layer under test: hands it a fixed activation, as a receive would."""

    def __init__(self, activation: torch.Tensor):
        super().__init__()
        self.activation = activation

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.activation


class _Sink(nn.Module):
    """Stage after the layer under test: its loss back-propagates a fixed output gradient."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@dataclass
class LayerBench:
    """One layer inside a PipelineRuntime on one pipeline rank, timed by the runtime's trace.

    The runtime holds the layer's stage between a feeder (its input becomes a leaf that
    requires grad, as a received activation does) and a sink (whose loss back-propagates a
    fixed gradient); the first layer has no feeder and the last no sink (its own loss). So the
    runtime's own F, B and W handlers run it: the memory meter's hooks, full recomputation and
    the split backward included.
    """

    runtime: object
    stage: int  # the layer's stage index in the runtime
    microbatches: list

    def run(self) -> dict[str, float]:
        """One micro-batch through every action: {"F": s, "B": s} (split: "I", "W") of it."""
        self.runtime.trace = []
        self.runtime.step(self.microbatches)
        mine = (entry for entry in self.runtime.trace if entry[0].stage == self.stage)
        return {action.kind.value: end - start for action, start, end in mine}


def build_layer_stage(ctx: _Context, index: int, tp, *, selective=False, store=None):
    """Layer `index` as the trainer builds a stage: sharded over tp, selective, split."""
    from hpcpipe.models.api import build_stage, enable_selective_recompute
    from hpcpipe.parallel.tensor_parallel import parallelize_stage
    from hpcpipe.pipeline.zero_bubble import enable_split_backward

    stage = build_stage(ctx.spec, ctx.model, range(index, index + 1), ctx.config.train.seed)
    if tp.size > 1:
        parallelize_stage(stage, ctx.spec, ctx.model, tp)
    if selective:
        enable_selective_recompute(stage)
    stage = stage.to(dtype=ctx.dtype)  # 16-bit: the trainer computes in it (fp32 masters)
    if store is not None:
        enable_split_backward(stage, store)
    return stage


def layer_bench(
    ctx: _Context, index: int, stage, tp, mbs: int, store=None, recompute="false", last=None
):
    """A LayerBench of `stage` (layers `index`..`last`, default just `index`) at micro-batch
    size `mbs`."""
    from hpcpipe.pipeline.runtime import PipelineRuntime
    from hpcpipe.pipeline.schedule import Action, Kind
    from hpcpipe.train.memory import SavedTensorMeter

    spec, model = ctx.spec, ctx.model
    shape = tuple(spec.boundary_shape(model, mbs))
    stages = {} if index == 0 else {0: _Feeder(torch.randn(shape, dtype=ctx.dtype))}
    me = len(stages)
    stages[me] = stage
    if (index if last is None else last) == spec.num_layers(model) - 1:
        loss_fn = spec.tp_plan().loss(model, tp) if tp.size > 1 else spec.loss
    else:
        stages[me + 1] = _Sink()
        loss_fn = _fixed_gradient_loss(torch.randn(shape, dtype=ctx.dtype))
    actions = [Action(s, Kind.F, 0) for s in stages]
    backward = Kind.B if store is None else Kind.I  # split: the layer's W follows
    actions += [Action(s, backward, 0) for s in reversed(stages) if s >= me]
    if store is not None:
        actions.append(Action(me, Kind.W, 0))
    tokens = torch.randint(0, model.vocab_size, (mbs, model.seq_len))
    runtime = PipelineRuntime(
        stages=stages,
        actions=actions,
        num_stages=len(stages),
        pp_size=1,
        p2p=None,
        activation_shape=shape,
        dtype=ctx.dtype,
        device=torch.device("cpu"),
        loss_fn=loss_fn,
        recompute=recompute,
        weight_store=store,
        memory_meter=SavedTensorMeter(),  # the trainer always meters its stages' forwards
    )
    return LayerBench(runtime, me, [(tokens, tokens)])


def _fixed_gradient_loss(gradient: torch.Tensor):
    """A loss whose gradient with respect to the output is `gradient`."""
    return lambda out, target: (out * gradient).sum()


def time_benches(ctx: _Context, benches: dict, tp_comm, repeats: int) -> dict[str, float]:
    """Median seconds of each bench's actions ({"plain.F": s, ...}), the group's slowest.

    The benches run interleaved (A, B, A, B: the machine drifts). Every rank of the tp group
    runs the same number of iterations, so their reductions pair up.
    """
    first = _group_max(tp_comm, [_iteration(benches)[1]], ctx.timeout)[0]
    for _ in range(WARMUPS - 1 if first <= SLOW_ITERATION_S else 0):
        _iteration(benches)
    count = repeat_count(first, repeats)
    samples: dict[str, list[float]] = {}
    for _ in range(count):
        if tp_comm.Get_size() > 1:
            # NOTE: the group starts each iteration together: otherwise one rank's lead
            # shows up as the other ranks' wait inside the layer's all-reduces
            ctx.barrier(tp_comm)
        for key, seconds in _iteration(benches)[0].items():
            samples.setdefault(key, []).append(seconds)
    keys = sorted(samples)
    medians = _group_max(tp_comm, [statistics.median(samples[k]) for k in keys], ctx.timeout)
    return {**dict(zip(keys, medians, strict=True)), "repeats": count}


def repeat_count(iteration_s: float, repeats: int) -> int:
    """How many timed iterations a point gets: `repeats`, but

    - fewer (at least 3) where they would take over POINT_BUDGET_S: a slow point's median is
      steady, and the whole profile should stay within a couple of minutes;
    - up to 3x as many where they take under FAST_POINT_S: one preemption by another process
      (a few milliseconds) would otherwise dominate a sub-millisecond layer's median.
    """
    iteration_s = max(iteration_s, 1e-9)
    if iteration_s * repeats > POINT_BUDGET_S:
        return max(min(repeats, 3), int(POINT_BUDGET_S / iteration_s))
    return max(repeats, min(3 * repeats, int(FAST_POINT_S / iteration_s)))


def _iteration(benches: dict) -> tuple[dict[str, float], float]:
    """One run of every bench: ({"name.KIND": seconds}, wall seconds)."""
    start = time.perf_counter()
    times = {}
    for name, bench in benches.items():
        times.update({f"{name}.{kind}": s for kind, s in bench.run().items()})
    return times, time.perf_counter() - start


# --- layers ---------------------------------------------------------------------------------


def _measure_layers(ctx: _Context, sizes, tps, say) -> list[dict]:
    """Rows of every (tp, group, micro-batch size, recompute); only tp group 0 computes."""
    from hpcpipe.parallel.tensor_parallel import TPContext

    rows = []
    for tp_size in tps:
        start = time.perf_counter()
        sub = ctx.first_ranks(tp_size)
        tp = None if sub is None else TPContext(sub, sub.Get_rank(), tp_size, ctx.timeout)
        for group in layer_groups(ctx.spec, ctx.model):
            rows += _measure_group(ctx, group, tp, tp_size, sizes)
        if sub is not None:
            sub.Free()
        say(f"hpcpipe profile: layers at tp={tp_size}: {time.perf_counter() - start:.1f} s")
    return rows


def _measure_group(ctx: _Context, group: dict, tp, tp_size: int, sizes) -> list[dict]:
    """The plain rows (F, B, W, BW) and, for a layer with an attention core, selective ones.

    Every rank walks the same points; those outside the tp group go straight to each point's
    barrier and sleep there.
    """
    from hpcpipe.pipeline.zero_bubble import WeightGradStore

    index, member = group["indices"][0], tp is not None
    if member:
        store = WeightGradStore()
        plain = build_layer_stage(ctx, index, tp)
        split = build_layer_stage(ctx, index, tp, store=store)
        selective = build_layer_stage(ctx, index, tp, selective=True)
    rows = []
    for mbs in sizes:
        if member:
            benches = {
                "plain": layer_bench(ctx, index, plain, tp, mbs),
                "split": layer_bench(ctx, index, split, tp, mbs, store),
            }
            times = time_benches(ctx, benches, tp.comm, ctx.repeats)
            rows.append(_plain_row(group, tp_size, mbs, times))
        ctx.barrier()
        if group["attention_core"]:
            if member:
                bench = {"plain": layer_bench(ctx, index, selective, tp, mbs)}
                times = time_benches(ctx, bench, tp.comm, ctx.repeats)
                rows.append(_selective_row(rows[-1], times))
            ctx.barrier()
    return rows if ctx.rank == 0 else []


def _plain_row(group: dict, tp: int, mbs: int, times: dict) -> dict:
    """F and BW from the plain runtime; B and W from the split one (its F: f_split)."""
    return {
        "group": group["group"],
        "indices": group["indices"],
        "tp": tp,
        "microbatch_size": mbs,
        "recompute": "false",
        "f": times["plain.F"],
        "b": times["split.I"],
        "w": times["split.W"],
        "bw": times["plain.B"],
        "f_split": times["split.F"],
        "busy_processes": tp,
        "repeats": times["repeats"],
    }


def _selective_row(plain: dict, times: dict) -> dict:
    """Measured F and BW. Selective recomputation redoes the attention core in backward, so
    the split's B gains what BW gained, and W (the weight gradients) does not change."""
    bw = times["plain.B"]
    return {
        **plain,
        "recompute": "selective",
        "f": times["plain.F"],
        "bw": bw,
        "b": max(plain["b"] + bw - plain["bw"], 0.0),
        "derived": ["b", "w", "f_split"],
        "repeats": times["repeats"],
    }


def _measure_full_recompute(ctx: _Context, sizes) -> dict:
    """The runtime's full recomputation measured once, interleaved with the plain runtime on
    the same layer (rank 0, tp 1, the most frequent group, the size nearest 4): its F runs
    without a graph and its B is forward + backward, to compare with the plain f + bw."""
    from mpi4py import MPI

    result = {}
    if ctx.rank == 0:
        group = _most_frequent(layer_groups(ctx.spec, ctx.model))
        index, mbs = group["indices"][0], min(sizes, key=lambda m: (abs(m - 4), m))
        tp = solo_tp(ctx)
        stage = build_layer_stage(ctx, index, tp)
        benches = {
            "plain": layer_bench(ctx, index, stage, tp, mbs),
            "full": layer_bench(ctx, index, stage, tp, mbs, recompute="full"),
        }
        times = time_benches(ctx, benches, MPI.COMM_SELF, ctx.repeats)
        result = {
            "full_recompute_check": {
                "group": group["group"],
                "microbatch_size": mbs,
                "f": times["full.F"],
                "b": times["full.B"],
                "plain_f": times["plain.F"],
                "plain_bw": times["plain.B"],
            }
        }
    ctx.barrier()
    return result


# --- contention -----------------------------------------------------------------------------


def _measure_contention(ctx: _Context, profile: dict) -> dict:
    """How fast the whole model's F + BW loop runs on each of n = 1..N processes at once.

    The loop runs the whole model as one stage (a dp-only training step without its
    reduction), not one layer: a training stage runs its layers back to back, and one layer
    between a feeder and a sink pays the runtime's per-action costs per layer, which made the
    layer loop's loaded steps 15-20 % slower than measured ones. It runs at a few sizes
    (contention_sizes), in rounds over every (size, n), each pair's median kept: the load of
    other jobs on the machine drifts, and n = 1 and n = N must be measured under the same
    load. speed[n-1] is the median over sizes of the rate with n busy over the rate alone;
    "sizes" keeps each size's seconds per iteration, to which the planner anchors its layer
    table (see ProfileMachine.speed).
    """
    windows = _contention_windows(ctx, profile)
    sizes = sorted(windows)
    tp = solo_tp(ctx)
    from hpcpipe.models.api import build_model

    whole = build_model(ctx.spec, ctx.model, ctx.config.train.seed).to(dtype=ctx.dtype)
    last = ctx.spec.num_layers(ctx.model) - 1
    benches = {m: layer_bench(ctx, 0, whole, tp, m, last=last) for m in sizes}
    for bench in benches.values():
        bench.run()  # warm-up, all ranks at once (allocations)
    counts = range(1, ctx.size + 1)
    rates = {(m, busy): [] for m in sizes for busy in counts}
    for _ in range(CONTENTION_ROUNDS):
        for m, busy in rates:
            rates[m, busy].append(_rate_per_process(ctx, benches[m], busy, windows[m]))
    seconds = {m: [1.0 / statistics.median(rates[m, busy]) for busy in counts] for m in sizes}
    speed = [
        statistics.median(seconds[m][0] / seconds[m][busy - 1] for m in sizes) for busy in counts
    ]
    return {
        "speed": speed,
        "sizes": [
            {"microbatch_size": m, "iteration_s": seconds[m], "window_s": windows[m]} for m in sizes
        ],
        "layers": "all",
        "rounds": CONTENTION_ROUNDS,
    }


def _rate_per_process(ctx: _Context, bench: LayerBench, busy: int, window: float) -> float:
    """Mean iterations per second of world ranks 0..busy-1 running the bench at once."""
    from hpcpipe.parallel.p2p import allreduce_

    ctx.barrier()
    rate = _loop_rate(bench, window) if ctx.rank < busy else 0.0
    total = torch.tensor([rate], dtype=torch.float64)
    allreduce_(ctx.comm, total, timeout=ctx.timeout)
    return float(total[0]) / busy


def _contention_window(profile: dict, mbs: int) -> float:
    """Seconds each (size, n) runs: long enough for a few loaded iterations at that size."""
    return max(CONTENTION_WINDOW_S, CONTENTION_ITERATIONS * model_f_bw(profile, mbs))


def contention_sizes(profile: dict) -> list[int]:
    """The micro-batch sizes whose whole-model F + BW at tp = 1 is nearest each of
    CONTENTION_TARGETS_S (each size once, smallest first)."""
    sizes = profile["microbatch_sizes"]
    return sorted(
        {min(sizes, key=lambda m: abs(model_f_bw(profile, m) - t)) for t in CONTENTION_TARGETS_S}
    )


def _contention_windows(ctx: _Context, profile: dict) -> dict[int, float]:
    """contention_sizes and each one's window, decided by rank 0 (it has the times)."""
    choice = None
    if ctx.rank == 0:
        choice = {m: _contention_window(profile, m) for m in contention_sizes(profile)}
    ctx.barrier()  # NOTE: so the blocking (spinning) broadcast below finds everyone there
    return ctx.comm.bcast(choice, root=0)


def model_f_bw(profile: dict, mbs: int) -> float:
    """The layer table's F + BW of every layer of the model at tp = 1, size `mbs`."""
    total = 0.0
    for group in profile["groups"]:
        row = next(
            r
            for r in profile["layers"]
            if r["group"] == group["group"]
            and r["tp"] == 1
            and r["recompute"] == "false"
            and r["microbatch_size"] == mbs
        )
        total += len(group["indices"]) * (row["f"] + row["bw"])
    return total


def _loop_rate(bench: LayerBench, window: float) -> float:
    """Iterations per second of the bench, run back to back for about `window` seconds."""
    start = time.perf_counter()
    count = 0
    while True:
        bench.run()
        count += 1
        elapsed = time.perf_counter() - start
        if elapsed >= window:
            return count / elapsed


# --- point-to-point -------------------------------------------------------------------------


def _measure_p2p(ctx: _Context, sizes) -> dict:
    """Ping-pong between world ranks 0 and 1 through P2P: the boundary activation at each
    micro-batch size, 8 B and 1 MiB; fitted one-way latency and bandwidth. `to_waiting`: the
    same messages to a rank that has waited WAITING_IDLE_S for them, fitted alike."""
    from hpcpipe.parallel.p2p import P2P

    itemsize = _itemsize(ctx.dtype)
    boundary = {math.prod(ctx.spec.boundary_shape(ctx.model, m)) * itemsize for m in sizes}
    p2p = P2P(ctx.comm, timeout=ctx.timeout) if ctx.rank < 2 else None
    points, waiting = [], []
    for nbytes in sorted(boundary | {8, 2**20}):
        if p2p is not None:
            hot = _ping_pong(p2p, ctx.rank, nbytes, ctx.dtype)
            points.append((nbytes, hot))
            waiting.append((nbytes, _to_waiting(p2p, ctx.rank, nbytes, ctx.dtype, hot)))
        ctx.barrier()
    if ctx.rank != 0:
        return {}
    return {
        **fit_alpha_beta(points),
        "points": [{"bytes": n, "seconds": t} for n, t in points],
        "to_waiting": {
            **fit_alpha_beta(waiting),
            "idle_s": WAITING_IDLE_S,
            "points": [{"bytes": n, "seconds": t} for n, t in waiting],
        },
    }


def _ping_pong(p2p, rank: int, nbytes: int, dtype: torch.dtype) -> float:
    """Median one-way seconds over PING_PONG_ROUNDS round trips (after 3 untimed ones)."""
    numel = max(1, nbytes // _itemsize(dtype))
    payload = torch.zeros(numel, dtype=dtype)
    peer, tag = 1 - rank, 7
    times = []
    for round_index in range(PING_PONG_ROUNDS + 3):
        # NOTE: each receive is posted before the peer sends, as a schedule posts its RECV
        # ahead; the waits are P2P's own (poll for a moment, then sleep).
        recv = p2p.irecv((numel,), dtype, "cpu", peer, tag, "a profiling ping-pong")
        start = time.perf_counter()
        if rank == 0:
            p2p.isend(payload, peer, tag)
            p2p.wait(recv)
        else:
            p2p.wait(recv)
            p2p.isend(payload, peer, tag)
        if round_index >= 3:
            times.append((time.perf_counter() - start) / 2)
        p2p.release(recv)
    p2p.flush()
    return statistics.median(times)


def _to_waiting(p2p, rank: int, nbytes: int, dtype: torch.dtype, ping_pong: float) -> float:
    """Median one-way seconds of a message to a rank that has waited WAITING_IDLE_S for it.

    A pipeline message on the critical path mostly reaches a rank that has been waiting a
    long time (every hop of the fill and the drain; each one of an M = 1 step): its polls have
    backed off to sleeps and the MPI transfer's rendezvous waits for them (1.5 ms a hop in
    traced dp2 pp2 M1 steps of 2 MiB, against 0.13 ms from the ping-pong). Rank 0 idles,
    sends, and times until rank 1's reply is back; the reply reaches a rank that has just
    sent, so it costs the ping-pong's one-way time (`ping_pong`), which is taken off.
    """
    numel = max(1, nbytes // _itemsize(dtype))
    payload = torch.zeros(numel, dtype=dtype)
    peer, tag = 1 - rank, 8
    times = []
    for round_index in range(PING_PONG_ROUNDS + 1):
        recv = p2p.irecv((numel,), dtype, "cpu", peer, tag, "a profiling message to a waiting rank")
        if rank == 0:
            time.sleep(WAITING_IDLE_S)
            start = time.perf_counter()
            p2p.isend(payload, peer, tag)
            p2p.wait(recv)
            if round_index >= 1:
                times.append(time.perf_counter() - start - ping_pong)
        else:
            p2p.wait(recv)
            p2p.isend(payload, peer, tag)
        p2p.release(recv)
        p2p.flush()
    return max(ping_pong, statistics.median(times)) if times else ping_pong


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# --- all-reduce -----------------------------------------------------------------------------


def _measure_allreduce(ctx: _Context) -> dict:
    """Per group size 2..N (world ranks 0..n-1): fits of the GradReducer's bucket reduction
    (top level) and of allreduce_, at 8 B up to the model's gradient bytes."""
    from hpcpipe.parallel.data_parallel import grad_dtype

    dtype = grad_dtype(ctx.dtype)
    params = sum(g["params"] * len(g["indices"]) for g in layer_groups(ctx.spec, ctx.model))
    sizes = collective_sizes(params * _itemsize(dtype))
    out = {}
    for size in range(2, ctx.size + 1):
        sub = ctx.first_ranks(size)
        points = []
        for nbytes in sizes:
            if sub is not None:
                points.append((nbytes, *_time_collectives(ctx, sub, nbytes, dtype)))
            ctx.barrier()
        if sub is not None:
            sub.Free()
        if ctx.rank == 0:
            out[str(size)] = {
                **fit_alpha_beta([(n, bucket) for n, bucket, _ in points]),
                "allreduce_": fit_alpha_beta([(n, plain) for n, _, plain in points]),
                "points": [
                    {"bytes": n, "grad_reducer_s": bucket, "allreduce__s": plain}
                    for n, bucket, plain in points
                ],
            }
    return out


def collective_sizes(gradient_bytes: int) -> list[int]:
    """8 B, 64 KiB, 1 MiB, then 4x steps up to the model's gradient bytes (included)."""
    sizes = {8, 2**16, 2**20, max(gradient_bytes, 8)}
    nbytes = 2**22
    while nbytes < gradient_bytes:
        sizes.add(nbytes)
        nbytes *= 4
    return sorted(sizes)


def _time_collectives(ctx: _Context, sub, nbytes: int, dtype) -> tuple[float, float]:
    """(bucket reduction, allreduce_) median seconds of nbytes over `sub`, slowest rank's.

    Back to back after one barrier: each reduction after the first starts as the previous
    one ends everywhere, so the barrier's sleepers waking late costs the timing nothing.
    """
    from hpcpipe.parallel.data_parallel import GradReducer
    from hpcpipe.parallel.p2p import allreduce_

    numel = max(1, nbytes // _itemsize(dtype))
    param = nn.Parameter(torch.zeros(numel, dtype=dtype))
    reducer = GradReducer([param], sub, 1, bucket_mb=nbytes / 2**20 + 1, timeout=ctx.timeout)
    flat = torch.zeros(numel, dtype=dtype)

    def bucket_reduction() -> float:
        reducer.start_step()  # NOTE: untimed: the trainer zeroes its buckets before F
        start = time.perf_counter()
        reducer.grad_ready(param)  # the gradient is final: the bucket's Iallreduce starts
        reducer.finish()
        return time.perf_counter() - start

    def plain_sum() -> float:
        start = time.perf_counter()
        allreduce_(sub, flat, timeout=ctx.timeout)
        return time.perf_counter() - start

    medians = []
    for reduction in (bucket_reduction, plain_sum):
        ctx.barrier(sub)
        times = [reduction() for _ in range(COLLECTIVE_REPEATS + 1)]
        medians.append(statistics.median(times[1:]))
    bucket, plain = _group_max(sub, medians, ctx.timeout)
    return bucket, plain


# --- optimizer ------------------------------------------------------------------------------


def _measure_optimizer(ctx: _Context) -> dict:
    """MasterOptimizer's step per parameter: the whole model on rank 0 alone, then every rank
    stepping a share of the layers at once; plus the trainer's per-step reductions."""
    layers = ctx.spec.num_layers(ctx.model)
    alone = _optimizer_step_time(ctx, range(layers)) if ctx.rank == 0 else (0, 0.0)
    ctx.barrier()
    share = range(ctx.rank, layers, ctx.size)
    numel, seconds = _optimizer_step_time(ctx, share) if len(share) else (0, 0.0)
    busy = _group_max(ctx.comm, [seconds / numel if numel else 0.0], ctx.timeout)[0]
    overhead = _step_overhead(ctx)
    if ctx.rank != 0:
        return {}
    return {
        "seconds_per_param": alone[1] / alone[0],
        "params": alone[0],
        "step_s": alone[1],
        "seconds_per_param_all_busy": busy,
        "step_overhead_s": overhead,
    }


def _optimizer_step_time(ctx: _Context, layers: range) -> tuple[int, float]:
    """(parameters, median seconds) of zeroing the gradient buckets plus one optimizer step.

    The trainer's pieces on this rank alone (COMM_SELF): buckets and fragments, the squared
    norm, clipping (random gradients get clipped), AdamW and the parameter refresh.
    """
    from mpi4py import MPI

    from hpcpipe.models.api import build_stage
    from hpcpipe.parallel.data_parallel import GradReducer
    from hpcpipe.train.precision import MasterOptimizer
    from hpcpipe.train.trainer import master_dtype, unique_named_parameters

    t, dtype = ctx.config.train, master_dtype(ctx.dtype)
    stages = {
        i: build_stage(ctx.spec, ctx.model, range(i, i + 1), t.seed).to(dtype) for i in layers
    }
    named = unique_named_parameters(stages)
    reducer = GradReducer([p for _, p in named], MPI.COMM_SELF, 1, timeout=ctx.timeout)
    master = MasterOptimizer(named, reducer, t, ctx.dtype)
    counted = {id(p) for _, p in named}
    times = []
    for repeat in range(ctx.repeats + 1):
        start = time.perf_counter()
        reducer.start_step()
        zeroing = time.perf_counter() - start
        for bucket in reducer.buckets:
            bucket.grad.normal_()
        start = time.perf_counter()
        master.step(master.square_sum(counted), t.grad_clip, t.lr)
        if repeat:  # the first step allocates AdamW's moments
            times.append(zeroing + time.perf_counter() - start)
    return sum(p.numel() for _, p in named), statistics.median(times)


def _step_overhead(ctx: _Context) -> float:
    """The trainer's three small world reductions of each step (loss and norm, the step's
    statistics, the memory maxima), all ranks at once: the slowest rank's median."""
    from mpi4py import MPI

    from hpcpipe.parallel.p2p import allreduce_

    def reductions() -> float:
        start = time.perf_counter()
        for numel, op in ((2, MPI.SUM), (4, MPI.SUM), (5, MPI.MAX)):
            allreduce_(ctx.comm, torch.zeros(numel, dtype=torch.float64), op, ctx.timeout)
        return time.perf_counter() - start

    ctx.barrier()
    times = [reductions() for _ in range(COLLECTIVE_REPEATS + 1)]
    return _group_max(ctx.comm, [statistics.median(times[1:])], ctx.timeout)[0]


# ============================================================================================
# Command line (until `hpcpipe plan --profile` calls run_profile)
# ============================================================================================


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hpcpipe.plan.profile",
        description="Profile this machine for the planner (under mpiexec -n N): layer times, "
        "core contention, messages, reductions, the optimizer. Model and train keys as for "
        "`hpcpipe train` (--model.n_layers=8 --train.dtype=float32 ...).",
    )
    p.add_argument("out", help="the profile to write (JSON)")
    p.add_argument("--config", help="TOML file with [model] [train] ... as for train")
    p.add_argument("--microbatch-sizes", help="e.g. 1,2,4 (default: divisors of global_batch)")
    p.add_argument("--tp", help="tp degrees, e.g. 1,2 (default: those the world size allows)")
    p.add_argument("--repeats", type=int, default=5, help="timed iterations per point")
    return p


def _int_list(text: str | None) -> list[int] | None:
    return [int(v) for v in text.split(",") if v.strip()] if text else None


def main(argv: list[str] | None = None) -> int:
    """Parse like `hpcpipe train`, check on every rank, profile; a failure aborts the job."""
    from mpi4py import MPI

    from hpcpipe import config as cfg
    from hpcpipe.cli.main import split_overrides

    comm = MPI.COMM_WORLD
    try:
        rest, overrides = split_overrides(list(sys.argv[1:] if argv is None else argv))
        args = _parser().parse_args(rest)
        config = cfg.load_config(args.config, overrides)
        sizes, tps = _int_list(args.microbatch_sizes), _int_list(args.tp)
        check_request(config, comm.Get_size(), sizes or [1], tps or [1], args.repeats)
    except ValueError as exc:  # ConfigError, or a list that is not integers
        _stderr(f"hpcpipe profile: configuration error: {exc}")
        return 2
    try:
        run_profile(
            config, args.out, comm, microbatch_sizes=sizes, tp_degrees=tps, repeats=args.repeats
        )
    except BaseException as exc:  # noqa: BLE001 - one failed rank must not leave the rest waiting
        import traceback

        _stderr(f"hpcpipe profile: rank {comm.Get_rank()} failed: {exc}\n{traceback.format_exc()}")
        comm.Abort(1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
