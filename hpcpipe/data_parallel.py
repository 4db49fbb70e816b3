"""Data parallelism: gradients averaged over the dp axis in buckets, overlapped with backward.

A parameter's gradient is final once it has been accumulated once per micro-batch (M times per
step). Each bucket starts its non-blocking Allreduce the moment all its parameters are final,
while the pipeline keeps computing; `finish` waits (politely) and writes the averages back.
"""

from __future__ import annotations

import time

import torch
from mpi4py import MPI
from torch import nn

from .p2p import _message, wait_politely

# 16-bit gradients are summed in float32 (the pip Open MPI corrupts bf16 sums silently).
_WIDE = {torch.bfloat16: torch.float32, torch.float16: torch.float32}


class _Bucket:
    """Parameters reduced together in one flat buffer."""

    def __init__(self, params: list[nn.Parameter]):
        self.params = params
        dtype = _WIDE.get(params[0].dtype, params[0].dtype)
        self.buffer = torch.empty(sum(p.numel() for p in params), dtype=dtype)
        self.pending = len(params)
        self.request = None

    def pack(self) -> None:
        offset = 0
        for p in self.params:
            n = p.numel()
            self.buffer[offset : offset + n].copy_(p.grad.reshape(-1))
            offset += n

    def unpack(self, scale: float) -> None:
        offset = 0
        for p in self.params:
            n = p.numel()
            p.grad.copy_(self.buffer[offset : offset + n].view_as(p.grad) * scale)
            offset += n


class GradReducer:
    """Averages gradients over `comm` (the dp axis) in buckets of about `bucket_mb` MiB."""

    def __init__(self, params: list[nn.Parameter], comm, microbatches: int, bucket_mb=25.0,
                 timeout: float = 300.0):  # fmt: skip
        self.comm, self.microbatches, self.timeout = comm, microbatches, timeout
        self.size = comm.Get_size()
        self.buckets = self._make_buckets(params, bucket_mb * 2**20)
        self.bucket_of = {id(p): b for b in self.buckets for p in b.params}
        self.counts: dict[int, int] = {}
        self.wait_seconds = 0.0
        self.deferred: set[int] = set()
        if self.size > 1:
            for p in params:
                p.register_post_accumulate_grad_hook(self._autograd_accumulated)

    def defer(self, params) -> None:
        """These parameters' gradients come from W actions, which call grad_ready themselves."""
        self.deferred.update(id(p) for p in params)

    def _autograd_accumulated(self, param: nn.Parameter) -> None:
        # NOTE: autograd calls this hook even when a split backward returned no gradient for
        # the parameter; deferred parameters are counted by their W instead.
        if id(param) not in self.deferred:
            self.grad_ready(param)

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

    def start_step(self) -> None:
        """Forget the previous step's counts."""
        self.counts.clear()
        for b in self.buckets:
            b.pending, b.request = len(b.params), None

    def grad_ready(self, param: nn.Parameter) -> None:
        """One accumulation of `param` happened; launch its bucket when all are final."""
        key = id(param)
        if key not in self.bucket_of or self.size == 1:
            return
        self.counts[key] = self.counts.get(key, 0) + 1
        if self.counts[key] == self.microbatches:
            bucket = self.bucket_of[key]
            bucket.pending -= 1
            if bucket.pending == 0:
                self._launch(bucket)

    def _launch(self, bucket: _Bucket) -> None:
        bucket.pack()
        bucket.request = self.comm.Iallreduce(MPI.IN_PLACE, _message(bucket.buffer), op=MPI.SUM)

    def finish(self) -> float:
        """Wait for every bucket (launching any not yet started); grads become dp means."""
        if self.size == 1:
            return 0.0
        start = time.perf_counter()
        deadline = time.monotonic() + self.timeout
        for bucket in self.buckets:
            if bucket.request is None:
                self._launch(bucket)  # e.g. a parameter this step did not touch M times
            wait_politely(
                bucket.request,
                deadline,
                lambda: (
                    f"data-parallel gradient Allreduce over {self.size} ranks did not finish "
                    f"within {self.timeout:.0f} s; a replica is stuck or dead"
                ),
            )
            bucket.unpack(1.0 / self.size)
        waited = time.perf_counter() - start
        self.wait_seconds += waited
        return waited
