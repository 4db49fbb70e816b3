"""Where a layout runs: an accelerator model (roofline + links) or a measured profile.

Both answer the same questions for the time model: one layer's F, B, W and unsplit backward
per micro-batch, the cost of a message and of the collectives, the optimizer step, and how
fast each process runs when several share the machine's cores (None: each has its own device).
"""

from __future__ import annotations

import functools
import os
import statistics
from dataclasses import dataclass, field

import torch

from hpcpipe.plan import roofline
from hpcpipe.plan.devices import Device

# Achieved fractions of peak (H100/A100 with cuBLAS and flash attention 2, as measured in
# Megatron-LM's and FlashAttention-2's papers): large GEMMs ~75 %, attention kernels ~50 %.
GEMM_FRACTION = 0.75
ATTENTION_FRACTION = 0.5
# AdamW with fp32 masters touches grad 4 + master 8 + moments 16 (+ the 16-bit copy 2) bytes
# per parameter, plus 4 for the gradient norm.
OPTIMIZER_BYTES = {True: 34, False: 32}


def ring_allreduce(n: int, nbytes: float, bandwidth: float, latency: float) -> float:
    """Ring all-reduce: 2(n-1)/n of the bytes cross each link, 2(n-1) steps."""
    if n <= 1:
        return 0.0
    return 2 * (n - 1) / n * nbytes / bandwidth + 2 * (n - 1) * latency


def ring_half(n: int, nbytes: float, bandwidth: float, latency: float) -> float:
    """Reduce-scatter or all-gather: half an all-reduce."""
    return ring_allreduce(n, nbytes, bandwidth, latency) / 2


@dataclass(frozen=True)
class LayerTimes:
    """Seconds of one micro-batch through one layer: forward, split backward (input and
    weight halves), and the unsplit backward."""

    f: float
    b: float
    w: float
    bw: float


def split_like_unsplit(f: float, b: float, w: float, bw: float) -> LayerTimes:
    """Measured times with the split backward's halves summing to the unsplit backward.

    The halves run the same GEMMs as the unsplit backward, and on this VM their sum is the
    noisiest row of a profile: b + w came out 2 % over bw in one profile and 31 % in another,
    while measured zb-h1 steps were never slower than 1f1b's. So bw (timed like f, in one
    piece) sets the total and the split's measurement only its shares.
    """
    if b + w <= 0:
        return LayerTimes(f, b, w, bw)
    scale = bw / (b + w)
    return LayerTimes(f, b * scale, w * scale, bw)


@dataclass
class DeviceMachine:
    """A cluster of one accelerator model, gpus_per_node per node (tp inside a node)."""

    device: Device
    gpus_per_node: int
    speed: list[float] | None = None
    step_overhead: float = 0.0
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return self.device.name

    @property
    def memory_bytes(self) -> float:
        return float(self.device.memory_bytes)

    def peak_tflops(self, dtype: str) -> float | None:
        return self.device.peak_tflops.get(dtype)

    def _roof(self, dtype: str) -> roofline.Roof:
        peak = self.device.peak_tflops[dtype] * 1e12
        return roofline.Roof(
            peak * GEMM_FRACTION, peak * ATTENTION_FRACTION, self.device.hbm_bytes_per_s
        )

    def layer_times(self, spec, model, index, tp, batch, dtype, recompute, tp_comm, processes=1):
        """Roofline times, plus tp's all-reduces (tp_comm: their count per pass and bytes);
        selective recomputation redoes the attention kernels' forward in B."""
        key = (index, tp, batch, str(dtype), recompute, tp_comm)
        if key not in self._cache:
            roof = self._roof(str(dtype).removeprefix("torch."))
            ops = roofline.layer_ops(spec, model, index, batch, dtype)
            f, b, w = roofline.layer_times(ops, roof, tp)
            if recompute == "selective":
                b += roofline.attention_time(ops, roof, tp)
            count, nbytes = tp_comm
            comm = count * self.allreduce(tp, nbytes, intra=True)
            self._cache[key] = LayerTimes(f + comm, b + comm, w, b + comm + w)
        return self._cache[key]

    def link(self, intra: bool) -> tuple[float, float]:
        d = self.device
        if intra:
            return d.intra_node_bytes_per_s, d.intra_node_latency_s
        return d.inter_node_bytes_per_s, d.inter_node_latency_s

    def p2p(self, nbytes: float, intra: bool) -> float:
        bandwidth, latency = self.link(intra)
        return latency + nbytes / bandwidth

    def allreduce(self, n: int, nbytes: float, intra: bool) -> float:
        return ring_allreduce(n, nbytes, *self.link(intra))

    def reduce_scatter(self, n: int, nbytes: float, intra: bool) -> float:
        return ring_half(n, nbytes, *self.link(intra))

    allgather = reduce_scatter

    def optimizer(self, numel: float, half: bool) -> float:
        return numel * OPTIMIZER_BYTES[half] / self.device.hbm_bytes_per_s


@dataclass
class ProfileMachine:
    """This machine as `hpcpipe plan --profile` measured it."""

    profile: object  # hpcpipe.plan.profile.Profile
    groups: dict[int, int]  # layer index -> profiled layer group
    memory: float = 0.0

    @property
    def name(self) -> str:
        machine = self.profile.machine
        return f"profile of {machine.get('hostname', '?')} ({machine.get('cpu', '?')})"

    @property
    def gpus_per_node(self) -> int:
        return int(self.profile.world_size)

    @property
    def memory_bytes(self) -> float:
        if self.memory:
            return self.memory
        recorded = self.profile.machine.get("memory_bytes")
        return float(recorded or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))

    @property
    def speed(self) -> list[float]:
        """Each process's rate with n busy, relative to the layer table's solo times.

        The table's rows are short measurements of one process alone, which drift by 10-30 %
        between profiles on a shared VM (turbo, the neighbour's load); the contention loop
        runs the F + BW of the whole model (older profiles: one block) for seconds with 1..N
        busy, interleaved, at a few micro-batch sizes. So the rate with n busy is the table's
        F + BW of what the loop ran over the loop's measured time with n busy (the median
        over the loop's sizes): fully loaded steps then take what the loop measured under
        full load. Beyond N busy the cores are taken as saturated.
        """
        n = max(1, int(self.profile.world_size))
        anchored = self._anchored
        if anchored is None:  # an older profile: the table's solo times as they are
            return [self.profile.speed(k) for k in range(1, 4 * n + 1)]
        return anchored + [
            anchored[-1] * len(anchored) / k for k in range(len(anchored) + 1, 4 * n + 1)
        ]

    @functools.cached_property
    def _anchored(self) -> list[float] | None:
        loop = self.profile.raw.get("contention", {})
        sizes = loop.get("sizes")
        if sizes is None and loop.get("iteration_s"):  # an older profile: one size
            sizes = [
                {"microbatch_size": loop["microbatch_size"], "iteration_s": loop["iteration_s"]}
            ]
        if not sizes:
            return None
        if loop.get("layers") == "all":  # the loop ran the whole model
            runs = [(g["group"], len(g["indices"])) for g in self.profile.groups]
        else:  # an older profile's loop ran one layer of `group`
            runs = [(loop["group"], 1)]
        ratios = []  # per size: the table's F + BW (as the planner reads it) / loop seconds
        for size in sizes:
            table = sum(
                count * self.profile.layer_time(group, 1, size["microbatch_size"], kind)
                for group, count in runs
                for kind in ("f", "bw")
            )
            ratios.append([table / seconds for seconds in size["iteration_s"]])
        return [statistics.median(column) for column in zip(*ratios, strict=True)]

    @property
    def step_overhead(self) -> float:
        return float(self.profile.optimizer.get("step_overhead_s", 0.0))

    def peak_tflops(self, dtype: str) -> float | None:
        return None

    def layer_times(self, spec, model, index, tp, batch, dtype, recompute, tp_comm, processes=1):
        """Measured times, as work at the speed of a process alone (they were measured with
        the tp group's processes busy together).

        A tp > 1 layer is its share of the tp = 1 layer's compute plus time spent in its
        all-reduces, waiting for the other tp ranks, which uses no core: while other
        processes compute that wait does not stretch. Counted as work at the rate of all the
        layout's `processes` busy, it lasts as long as measured when the cores are full.
        """
        group = self.groups[index]
        mode = "selective" if recompute == "selective" else "false"
        kinds = ("f", "b", "w", "bw")
        measured = [self.profile.layer_time(group, tp, batch, k, mode) for k in kinds]
        if tp == 1:
            return split_like_unsplit(*measured)
        alone, full = self.profile.speed(tp), self.profile.speed(max(processes, tp))
        work = []
        for kind, t in zip(kinds, measured, strict=True):
            compute = self.profile.layer_time(group, 1, batch, kind, mode) / tp
            wait = max(0.0, t - compute / alone)
            work.append(compute + wait * full)
        return split_like_unsplit(*work)

    def p2p(self, nbytes: float, intra: bool) -> float:
        """A pipeline hop: the message to a rank that has been waiting for it. Where a hop is
        on the critical path its receiver was mostly waiting (a busy receiver hides the hop
        whatever it costs), and there hpcpipe's polite waits have backed off to sleeps."""
        return self.profile.p2p_time(nbytes, to_waiting=True)

    def allreduce(self, n: int, nbytes: float, intra: bool) -> float:
        return self.profile.allreduce_time(n, nbytes) if n > 1 else 0.0

    def reduce_scatter(self, n: int, nbytes: float, intra: bool) -> float:
        return self.allreduce(n, nbytes, intra) / 2

    allgather = reduce_scatter

    def optimizer(self, numel: float, half: bool) -> float:
        # every rank steps at the same moment, so the cores are shared then too
        rates = self.profile.optimizer
        per_param = rates.get("seconds_per_param_all_busy") or rates["seconds_per_param"]
        return numel * float(per_param)


def element_size(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
