"""Gradient buckets: accumulation in the optimizer's precision, dp reduction, ZeRO-1 sharding.

As Megatron's ParamAndGradBuffer and torch DDP's gradient_as_bucket_view, every parameter lives
in one flat bucket buffer and its gradient in a second one of the same layout:

- float32/float64 runs: each `.grad` is a view into the gradient bucket, so autograd accumulates
  straight into what MPI reduces (no packing).
- 16-bit runs: the gradient bucket is float32; after each micro-batch the 16-bit `.grad` is
  added into it and dropped (Megatron's accumulate_allreduce_grads_in_fp32), so micro-batches
  are summed, and dp replicas reduced, in float32 (the pip Open MPI also sums bf16 wrongly).

A parameter's gradient is final once accumulated M times (once per micro-batch; tied copies
once more, after the tie sum); a bucket's non-blocking reduction starts the moment all of its
parameters are final, while the pipeline keeps computing, and `finish` waits for them all.
With `zero=0` the reduction is an Allreduce; with `zero=1` a Reduce_scatter, each dp rank
receiving the mean gradient of the 1/dp of the bucket whose optimizer state it owns, and
`gather_params` all-gathers the updated parameters afterwards.
"""

from __future__ import annotations

import time

import torch
from mpi4py import MPI
from torch import nn

from hpcpipe.parallel.p2p import _message, cuda_aware_mpi, wait_politely

_WIDE = {torch.bfloat16: torch.float32, torch.float16: torch.float32}


def grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """Gradients are accumulated and reduced in float32 for 16-bit parameters."""
    return _WIDE.get(dtype, dtype)


class Bucket:
    """Parameters reduced together: one flat parameter buffer and one flat gradient buffer.

    `shard` is the [lo, hi) range of the flat buffers whose optimizer state this dp rank owns
    (the whole bucket without ZeRO); the buffers are padded to a multiple of dp under ZeRO.
    """

    def __init__(self, params: list[nn.Parameter], dp: int, dp_rank: int, zero: bool):
        self.params = params
        self.offsets, offset = [], 0
        for p in params:
            self.offsets.append(offset)
            offset += p.numel()
        numel = -(-offset // dp) * dp if zero else offset
        dtype, device = params[0].dtype, params[0].device
        self.param = torch.zeros(numel, dtype=dtype, device=device)
        for i, p in enumerate(params):
            view = self.param_view(i)
            view.copy_(p.detach())
            p.data = view  # the parameter now lives in the bucket (all-gathered in place)
        self.grad = torch.zeros(numel, dtype=grad_dtype(dtype), device=device)
        self.as_views = self.grad.dtype == dtype
        size = numel // dp if zero else numel
        self.shard = (dp_rank * size, (dp_rank + 1) * size) if zero else (0, numel)
        # ZeRO: the reduce-scatter lands here (this rank's mean gradient); else a view.
        separate = zero and dp > 1
        self.grad_shard = self.grad.new_zeros(size) if separate else self.grad[: self.shard[1]]
        self.pending = len(params)
        self.request = None
        self.host = None  # host copies while a staged reduction is in flight

    def cast(self, dtype: torch.dtype) -> None:
        """Store the parameters in `dtype` (16-bit compute); the gradients keep their dtype."""
        if dtype == self.param.dtype:
            return
        self.param = self.param.to(dtype)
        for i, p in enumerate(self.params):
            p.data = self.param_view(i)
        self.as_views = self.grad.dtype == dtype

    def param_view(self, index: int) -> torch.Tensor:
        start, p = self.offsets[index], self.params[index]
        return self.param[start : start + p.numel()].view_as(p)

    def grad_view(self, index: int) -> torch.Tensor:
        start, p = self.offsets[index], self.params[index]
        return self.grad[start : start + p.numel()].view_as(p)

    def attach(self) -> None:
        """Zero the gradients; in float32/64 runs each .grad becomes a view into the bucket."""
        self.grad.zero_()
        for i, p in enumerate(self.params):
            p.grad = self.grad_view(i) if self.as_views else None

    def fold(self, index: int) -> None:
        """Bring a parameter's .grad into the bucket (added when 16-bit, or when autograd
        replaced our view with a tensor of its own)."""
        p, view = self.params[index], self.grad_view(index)
        if p.grad is None or p.grad.data_ptr() == view.data_ptr():
            return
        view.add_(p.grad)
        p.grad = view if self.as_views else None

    def nbytes(self) -> int:
        return self.grad.numel() * self.grad.element_size()


class GradReducer:
    """Gradient buckets of about `bucket_mb` MiB, reduced over `comm` (the dp axis)."""

    def __init__(self, params: list[nn.Parameter], comm, microbatches: int, bucket_mb=25.0,
                 timeout: float = 300.0, zero: bool = False, isolate=()):  # fmt: skip
        """isolate: parameters (tied copies) that get buckets of their own and are final only
        after one more `grad_ready` than the M micro-batches (the tie sum's)."""
        self.comm, self.microbatches, self.timeout = comm, microbatches, timeout
        self.size, self.rank = comm.Get_size(), comm.Get_rank()
        self.zero = bool(zero)
        # Device buffers go to MPI directly only when it is CUDA-aware; else through host copies.
        self.staged = bool(params) and params[0].device.type != "cpu" and not cuda_aware_mpi()
        extra = {id(p) for p in isolate}
        self.required = {id(p): microbatches + (id(p) in extra) for p in params}
        self.buckets = self._make_buckets(params, bucket_mb * 2**20, extra)
        self.bucket_of = {id(p): (b, i) for b in self.buckets for i, p in enumerate(b.params)}
        self.counts: dict[int, int] = {}
        self.deferred: set[int] = set()
        self.wait_seconds = 0.0
        for p in params:
            p.register_post_accumulate_grad_hook(self._autograd_accumulated)

    def _make_buckets(self, params: list[nn.Parameter], limit: float, isolate: set[int]):
        """Reverse order: the last layers' gradients are final first. Isolated ones alone."""
        groups, current, size = [], [], 0
        for p in reversed(params):
            nbytes = p.numel() * p.element_size()
            alone = id(p) in isolate
            if current and (alone or size + nbytes > limit or p.dtype != current[0].dtype):
                groups.append(current)
                current, size = [], 0
            current.append(p)
            size += nbytes
            if alone:
                groups.append(current)
                current, size = [], 0
        if current:
            groups.append(current)
        return [Bucket(g, self.size, self.rank, self.zero) for g in groups]

    def defer(self, params) -> None:
        """These parameters' gradients come from W actions, which call grad_ready themselves."""
        self.deferred.update(id(p) for p in params)

    def grad(self, param: nn.Parameter) -> torch.Tensor:
        """The accumulated (after finish: reduced, where this rank owns it) gradient."""
        bucket, index = self.bucket_of[id(param)]
        return bucket.grad_view(index)

    def start_step(self) -> None:
        """Zeroed buckets; forget the previous step's counts."""
        self.counts.clear()
        for b in self.buckets:
            b.pending, b.request = len(b.params), None
            b.attach()

    def _autograd_accumulated(self, param: nn.Parameter) -> None:
        # NOTE: autograd calls this hook even when a split backward returned no gradient for
        # the parameter; deferred parameters are counted by their W instead.
        if id(param) not in self.deferred:
            self.grad_ready(param)

    def grad_ready(self, param: nn.Parameter) -> None:
        """One accumulation of `param` happened; launch its bucket when all are final."""
        bucket, index = self.bucket_of[id(param)]
        bucket.fold(index)
        key = id(param)
        self.counts[key] = self.counts.get(key, 0) + 1
        if self.counts[key] == self.required[key]:
            bucket.pending -= 1
            if bucket.pending == 0:
                self._launch(bucket)

    def _launch(self, bucket: Bucket) -> None:
        # NOTE: every dp replica runs the same schedule, so buckets launch in the same order
        # everywhere, as MPI requires of collectives on one communicator.
        for i in range(len(bucket.params)):
            bucket.fold(i)
        if self.size == 1:
            bucket.request = True
            return
        grad, shard = bucket.grad, bucket.grad_shard
        if self.staged:  # NOTE: .cpu() waits for the stream that produced the gradients
            grad = grad.cpu()
            shard = shard.cpu() if self.zero else grad
            bucket.host = (grad, shard)
        if self.zero:
            bucket.request = self.comm.Ireduce_scatter_block(
                _message(grad), _message(shard), op=MPI.SUM
            )
        else:
            bucket.request = self.comm.Iallreduce(MPI.IN_PLACE, _message(grad), op=MPI.SUM)

    def finish(self) -> float:
        """Wait for every bucket (launching any not yet started); this rank's shard of each
        gradient bucket becomes the dp mean. Returns the seconds spent waiting."""
        start = time.perf_counter()
        deadline = time.monotonic() + self.timeout
        for bucket in self.buckets:
            if bucket.request is None:
                self._launch(bucket)  # e.g. a parameter this step did not touch M times
            if bucket.request is True:
                continue
            self._wait(bucket.request, bucket.nbytes(), deadline, "gradient reduction")
            if self.staged:
                bucket.grad_shard.copy_(bucket.host[1][: bucket.grad_shard.numel()])
                bucket.host = None
            bucket.grad_shard.mul_(1.0 / self.size)
        waited = time.perf_counter() - start
        self.wait_seconds += waited
        return waited

    def gather_params(self) -> float:
        """ZeRO: every rank updated its shard of each parameter bucket; all-gather the rest."""
        if not self.zero or self.size == 1:
            return 0.0
        start = time.perf_counter()
        deadline = time.monotonic() + self.timeout
        buffers = [b.param.cpu() if self.staged else b.param for b in self.buckets]
        requests = [self.comm.Iallgather(MPI.IN_PLACE, _message(buf)) for buf in buffers]
        for bucket, buffer, request in zip(self.buckets, buffers, requests, strict=True):
            nbytes = bucket.param.numel() * bucket.param.element_size()
            self._wait(request, nbytes, deadline, "parameter all-gather")
            if buffer is not bucket.param:
                bucket.param.copy_(buffer)
        waited = time.perf_counter() - start
        self.wait_seconds += waited
        return waited

    def _wait(self, request, nbytes: int, deadline: float, what: str) -> None:
        # NOTE: a non-blocking collective advances only inside MPI calls, so poll it
        # tightly (yielding the core) rather than sleeping between polls.
        wait_politely(
            request,
            deadline,
            lambda: (
                f"data-parallel {what} over {self.size} ranks did not finish within "
                f"{self.timeout:.0f} s; a replica is stuck or dead"
            ),
            spin=min(1.0, 1e-3 + nbytes / 1e8),
        )
