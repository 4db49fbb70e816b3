"""Data parallelism: gradients averaged over the dp axis in buckets, overlapped with backward.

As torch DDP's gradient_as_bucket_view: each bucket is one flat buffer and every parameter's
.grad is a view into it, so autograd accumulates straight into what MPI reduces (no packing).
A parameter's gradient is final once accumulated once per micro-batch (M times per step); a
bucket's non-blocking Allreduce starts the moment all its parameters are final, while the
pipeline keeps computing, and `finish` waits and turns the sums into means in place.
16-bit gradients are copied into a float32 bucket instead (the pip Open MPI sums bf16 wrongly).
"""

from __future__ import annotations

import time

import torch
from mpi4py import MPI
from torch import nn

from hpcpipe.parallel.p2p import _message, wait_politely

_WIDE = {torch.bfloat16: torch.float32, torch.float16: torch.float32}


class _Bucket:
    """Parameters reduced together in one flat buffer."""

    def __init__(self, params: list[nn.Parameter]):
        self.params = params
        dtype = params[0].dtype
        self.buffer = torch.zeros(sum(p.numel() for p in params), dtype=_WIDE.get(dtype, dtype))
        self.as_views = dtype not in _WIDE
        self.offsets, offset = [], 0
        for p in params:
            self.offsets.append(offset)
            offset += p.numel()
        self.pending = len(params)
        self.request = None

    def view(self, index: int) -> torch.Tensor:
        p = self.params[index]
        start = self.offsets[index]
        return self.buffer[start : start + p.numel()].view_as(p)

    def attach(self) -> None:
        """Zero the bucket and make each .grad a view into it (autograd accumulates in place)."""
        self.buffer.zero_()
        for i, p in enumerate(self.params):
            p.grad = self.view(i) if self.as_views else None

    def gather(self) -> None:
        """Bring every gradient into the buffer (a copy where .grad is not our view)."""
        for i, p in enumerate(self.params):
            view = self.view(i)
            if p.grad is None:
                view.zero_()
            elif p.grad.data_ptr() != view.data_ptr():
                view.copy_(p.grad)  # 16-bit, or autograd replaced the view

    def scatter(self, scale: float) -> None:
        """Sums -> means, and every .grad reads them."""
        self.buffer.mul_(scale)
        for i, p in enumerate(self.params):
            view = self.view(i)
            if p.grad is None or p.grad.data_ptr() != view.data_ptr():
                p.grad = view.to(p.dtype) if view.dtype != p.dtype else view


class GradReducer:
    """Averages gradients over `comm` (the dp axis) in buckets of about `bucket_mb` MiB."""

    def __init__(self, params: list[nn.Parameter], comm, microbatches: int, bucket_mb=25.0,
                 timeout: float = 300.0):  # fmt: skip
        self.comm, self.microbatches, self.timeout = comm, microbatches, timeout
        self.size = comm.Get_size()
        self.buckets = self._make_buckets(params, bucket_mb * 2**20) if self.size > 1 else []
        self.bucket_of = {id(p): b for b in self.buckets for p in b.params}
        self.counts: dict[int, int] = {}
        self.deferred: set[int] = set()
        self.wait_seconds = 0.0
        for p in params if self.size > 1 else []:
            p.register_post_accumulate_grad_hook(self._autograd_accumulated)

    @staticmethod
    def _make_buckets(params: list[nn.Parameter], limit: float) -> list[_Bucket]:
        """Group by dtype in reverse order: the last layers' gradients are final first."""
        buckets, current, size = [], [], 0
        for p in reversed(params):
            if current and (size + p.numel() * p.element_size() > limit or
                            p.dtype != current[0].dtype):  # fmt: skip
                buckets.append(_Bucket(current))
                current, size = [], 0
            current.append(p)
            size += p.numel() * p.element_size()
        if current:
            buckets.append(_Bucket(current))
        return buckets

    def defer(self, params) -> None:
        """These parameters' gradients come from W actions, which call grad_ready themselves."""
        self.deferred.update(id(p) for p in params)

    def start_step(self) -> None:
        """Zeroed bucket views as the gradients; forget the previous step's counts."""
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
        key = id(param)
        if key not in self.bucket_of:
            return
        self.counts[key] = self.counts.get(key, 0) + 1
        if self.counts[key] == self.microbatches:
            bucket = self.bucket_of[key]
            bucket.pending -= 1
            if bucket.pending == 0:
                self._launch(bucket)

    def _launch(self, bucket: _Bucket) -> None:
        # NOTE: every dp replica runs the same schedule, so buckets launch in the same order
        # everywhere, as MPI requires of collectives on one communicator.
        bucket.gather()
        bucket.request = self.comm.Iallreduce(MPI.IN_PLACE, _message(bucket.buffer), op=MPI.SUM)

    def finish(self) -> float:
        """Wait for every bucket (launching any not yet started); grads become dp means."""
        if not self.buckets:
            return 0.0
        start = time.perf_counter()
        deadline = time.monotonic() + self.timeout
        for bucket in self.buckets:
            if bucket.request is None:
                self._launch(bucket)  # e.g. a parameter this step did not touch M times
            # NOTE: a non-blocking collective advances only inside MPI calls, so poll it
            # tightly (yielding the core) rather than sleeping between polls.
            nbytes = bucket.buffer.numel() * bucket.buffer.element_size()
            wait_politely(
                bucket.request,
                deadline,
                lambda: (
                    f"data-parallel gradient Allreduce over {self.size} ranks did not finish "
                    f"within {self.timeout:.0f} s; a replica is stuck or dead"
                ),
                spin=min(1.0, 1e-3 + nbytes / 1e8),
            )
            bucket.scatter(1.0 / self.size)
        waited = time.perf_counter() - start
        self.wait_seconds += waited
        return waited
