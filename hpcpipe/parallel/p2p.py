"""Point-to-point tensor transfer between pipeline stages over MPI, and tensor reductions.

Buffers go to MPI as raw memory with an explicit datatype (never inferred), always contiguous and
detached: see ../shared/FIELD-NOTES.md for the silent-corruption traps this avoids.
"""

from __future__ import annotations

import ctypes
import os
import time
from dataclasses import dataclass, field

import torch
from mpi4py import MPI


class P2PTimeout(RuntimeError):
    """A peer did not deliver within the deadline."""


# 16-bit floats travel as 16-bit integers: MPI has no portable type for them, and point-to-point
# only has to move bytes. Reductions of these types go through float32 (see allreduce_).
_MPI_TYPES = {
    torch.float64: MPI.DOUBLE,
    torch.float32: MPI.FLOAT,
    torch.float16: MPI.INT16_T,
    torch.bfloat16: MPI.INT16_T,
    torch.int64: MPI.INT64_T,
    torch.int32: MPI.INT32_T,
    torch.int16: MPI.INT16_T,
    torch.uint8: MPI.UINT8_T,
    torch.int8: MPI.INT8_T,
    torch.bool: MPI.C_BOOL,
}
_BIT_VIEWS = {torch.float16: torch.int16, torch.bfloat16: torch.int16}


def mpi_datatype(dtype: torch.dtype):
    """The MPI datatype that moves one element of `dtype`."""
    try:
        return _MPI_TYPES[dtype]
    except KeyError:
        raise TypeError(f"no MPI datatype for {dtype}; supported: {list(_MPI_TYPES)}") from None


def _message(tensor: torch.Tensor) -> list:
    """[buffer, datatype] for a contiguous tensor (CPU via numpy, device via DLPack)."""
    t = tensor.detach() if tensor.requires_grad else tensor
    if not t.is_contiguous():
        # NOTE: a transposed tensor would be sent silently in memory order; refuse instead.
        raise ValueError("MPI buffers must be contiguous; call .contiguous() first")
    datatype = mpi_datatype(t.dtype)
    bits = _BIT_VIEWS.get(t.dtype)
    if bits is not None:
        t = t.view(bits)
    return [t.numpy() if t.device.type == "cpu" else t, datatype]


def cuda_aware_mpi() -> bool:
    """Whether the loaded MPI library can take device pointers (HPCPIPE_CUDA_AWARE overrides)."""
    forced = os.environ.get("HPCPIPE_CUDA_AWARE")
    if forced is not None:
        return forced.lower() in ("1", "true", "yes")
    # mpi4py has no query for this; Open MPI and MPICH both export MPIX_Query_cuda_support.
    try:
        query = ctypes.CDLL(None).MPIX_Query_cuda_support
    except AttributeError:
        return False
    return bool(query())


def make_tag(microbatch: int, stage: int, direction: int, num_stages: int, tag_ub: int) -> int:
    """Tag for the message of (microbatch, destination stage, direction 0=fwd 1=bwd).

    Wrapping at the tag bound is safe: MPI keeps messages with the same (source, tag, comm) in
    order, and both sides post each stream's messages in micro-batch order.
    """
    return ((microbatch * num_stages + stage) * 2 + direction) % (tag_ub + 1)


def ranks_share_cores() -> bool:
    """Whether this node runs more MPI ranks than it has cores, so waiting ranks must yield.

    HPCPIPE_YIELD=1/0 forces the answer. Otherwise the launcher's local rank count (Open MPI,
    MPICH's Hydra, Slurm) is compared with the node's cores; an unknown count counts as shared.
    """
    forced = os.environ.get("HPCPIPE_YIELD")
    if forced is not None:
        return forced.lower() in ("1", "true", "yes")
    for key in ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(key, "")
        if value.isdigit():
            return int(value) > (os.cpu_count() or 1)
    return True


# NOTE: read once: a rank's placement does not change while it runs.
_YIELD_WHILE_SPINNING = ranks_share_cores()


def wait_politely(request, deadline: float, describe, spin: float = 2e-4) -> float:
    """Wait for an MPI request without hogging a core; return the seconds spent waiting.

    Both pip MPIs busy-poll inside blocking waits, which starves working ranks when ranks
    outnumber cores. So: first poll for `spin` seconds, yielding the core between polls when
    ranks share cores (a message that is nearly here costs no sleep latency, and a rank with
    work to do on this core gets it; with a core per rank the yield is a wasted system call on
    every hop's critical path); then sleep between polls, backing off to 1 ms (about 1% of a
    core while a rank waits for a slow peer).
    """
    start = time.perf_counter()
    spin_until = start + spin
    test = request.Test
    while True:
        # NOTE: every poll drives MPI progress; yielding after each one slows it. The clock is
        # read only once per 8 polls too: it costs as much as a poll.
        for _ in range(8):
            if test():
                return time.perf_counter() - start
        if _YIELD_WHILE_SPINNING:
            os.sched_yield()
        if time.perf_counter() >= spin_until:
            break
    delay = 5e-5
    while not request.Test():
        if time.monotonic() > deadline:
            raise P2PTimeout(describe())
        time.sleep(delay)
        delay = min(delay * 1.5, 1e-3)
    return time.perf_counter() - start


def spin_for(nbytes: int) -> float:
    """How long to poll before sleeping: a bit longer than the bytes take to arrive."""
    return min(2e-4 + nbytes / 2e9, 1e-2)


_from_address = MPI.buffer.fromaddress


def _host_message(t: torch.Tensor) -> list:
    """[buffer, datatype] over a contiguous, detached CPU tensor's memory (no view objects).

    The buffer does not keep the tensor alive: callers hold it until the request completes.
    16-bit floats go as INT16_T: the byte count over the datatype's size gives the count.
    """
    return [_from_address(t.data_ptr(), t.nbytes), _MPI_TYPES[t.dtype]]


class BufferPool:
    """Receive buffers reused across steps, keyed by (shape, dtype, device).

    Each buffer keeps its key and ready-made MPI message, so a receive costs no view creation
    and a release no key computation. The pool holds every buffer it made, so an id is never
    reused while the pool lives.
    """

    def __init__(self):
        self._free: dict[tuple, list[torch.Tensor]] = {}
        self._made: dict[int, tuple[torch.Tensor, tuple, list]] = {}
        self.allocated = 0

    def get(self, shape, dtype, device) -> torch.Tensor:
        """A buffer of this shape, recycled when one is free."""
        key = (tuple(shape), dtype, str(device))
        free = self._free.get(key)
        if free:
            return free.pop()
        self.allocated += 1
        pin = key[2] == "cpu" and torch.cuda.is_available()
        buffer = torch.empty(shape, dtype=dtype, device=device, pin_memory=pin)
        self._made[id(buffer)] = (buffer, key, _message(buffer))
        return buffer

    def buffers(self) -> list[torch.Tensor]:
        """Every buffer the pool made (memory accounting)."""
        return [buffer for buffer, _, _ in self._made.values()]

    def message(self, buffer: torch.Tensor) -> list:
        """The cached [buffer, datatype] of a pooled tensor."""
        return self._made[id(buffer)][2]

    def put(self, tensor: torch.Tensor) -> None:
        """Return a buffer for reuse."""
        made = self._made.get(id(tensor))
        if made is not None and made[0] is tensor:
            key = made[1]
        else:
            key = (tuple(tensor.shape), tensor.dtype, str(tensor.device))
        self._free.setdefault(key, []).append(tensor)


@dataclass(slots=True)
class Transfer:
    """One posted receive: where the data lands and what to tell the user if it never comes."""

    request: object
    buffer: torch.Tensor
    device_tensor: torch.Tensor | None
    peer: int
    tag: int
    what: str
    spin: float
    received: bool = False


@dataclass
class P2P:
    """Non-blocking sends/receives of tensors on one communicator (the pipeline axis)."""

    comm: object
    timeout: float = 300.0
    cuda_aware: bool = field(default_factory=cuda_aware_mpi)
    pool: BufferPool = field(default_factory=BufferPool)
    wait_seconds: float = 0.0
    _sends: list = field(default_factory=list)

    def __post_init__(self):
        # NOTE: TAG_UB is only guaranteed on COMM_WORLD, not on derived communicators.
        self.tag_ub = MPI.COMM_WORLD.Get_attr(MPI.TAG_UB)
        self.rank = self.comm.Get_rank()
        self._comm_isend = self.comm.Isend  # bound once: isend is on every hop's critical path

    def buffers(self) -> list[torch.Tensor]:
        """The receive buffers this endpoint holds (memory accounting)."""
        return self.pool.buffers()

    def isend(self, tensor: torch.Tensor, peer: int, tag: int) -> None:
        """Start sending; the tensor is kept alive until the send completes."""
        if tensor.is_cpu and tensor.is_contiguous():
            # The hot path, on the critical path of every hop: the fewest Python calls that
            # are still safe (a tensor that requires grad is only read here, never written).
            message = [_from_address(tensor.data_ptr(), tensor.nbytes), _MPI_TYPES[tensor.dtype]]
            self._sends.append((self._comm_isend(message, peer, tag), tensor, False))
        else:
            self._isend_other(tensor, peer, tag)
        if len(self._sends) > 4:
            self._reap_sends()

    def _isend_other(self, tensor: torch.Tensor, peer: int, tag: int) -> None:
        """Non-contiguous or device tensors: made contiguous, staged through host if needed."""
        tensor = tensor.detach().contiguous()
        staged = False
        if tensor.is_cpu:
            message = _host_message(tensor)
        elif self.cuda_aware:
            torch.cuda.current_stream(tensor.device).synchronize()
            message = _message(tensor)
        else:
            host = self.pool.get(tensor.shape, tensor.dtype, "cpu")
            host.copy_(tensor)
            tensor, staged = host, True
            message = self.pool.message(host)
        self._sends.append((self.comm.Isend(message, peer, tag), tensor, staged))

    def irecv(self, shape, dtype, device, peer: int, tag: int, what: str) -> Transfer:
        """Post a receive into a pooled buffer; `wait` hands back the tensor."""
        cpu = str(device) == "cpu"
        on_host = cpu or not self.cuda_aware
        buffer = self.pool.get(shape, dtype, "cpu" if on_host else device)
        if not on_host:
            torch.cuda.current_stream(buffer.device).synchronize()
        request = self.comm.Irecv(self.pool.message(buffer), source=peer, tag=tag)
        device_tensor = None if cpu or not on_host else device
        spin = spin_for(buffer.nbytes)
        return Transfer(request, buffer, device_tensor, peer, tag, what, spin)

    def wait(self, transfer: Transfer) -> torch.Tensor:
        """Block (politely) until the transfer's data is here; return it on the target device."""
        if not transfer.received and not transfer.request.Test():
            self.wait_seconds += wait_politely(
                transfer.request,
                time.monotonic() + self.timeout,
                lambda: (
                    f"pipeline rank {self.rank}: no data for {transfer.what} from pipeline "
                    f"rank {transfer.peer} (tag {transfer.tag}) within {self.timeout:.0f} s; "
                    "the peer is stuck or dead (raise parallel.timeout if its stage is that "
                    "slow)"
                ),
                spin=transfer.spin,
            )
        transfer.received = True
        if transfer.device_tensor is None:
            return transfer.buffer
        staged, transfer.buffer = transfer.buffer, transfer.buffer.to(transfer.device_tensor)
        self.pool.put(staged)
        return transfer.buffer

    def release(self, transfer: Transfer) -> None:
        """Give a received buffer back to the pool once nothing reads it any more."""
        if transfer.device_tensor is None or self.cuda_aware:
            self.pool.put(transfer.buffer)

    def _reap_sends(self) -> None:
        """Drop completed sends (and give staged host buffers back)."""
        pending = []
        for request, tensor, staged in self._sends:
            if not request.Test():
                pending.append((request, tensor, staged))
            elif staged:
                self.pool.put(tensor)
        self._sends = pending

    def flush(self) -> None:
        """Wait for every outstanding send (end of a step)."""
        deadline = None
        for request, tensor, staged in self._sends:
            if not request.Test():
                deadline = deadline or time.monotonic() + self.timeout
                self.wait_seconds += wait_politely(
                    request,
                    deadline,
                    lambda: (
                        f"pipeline rank {self.rank}: a send was not received within "
                        f"{self.timeout:.0f} s; a peer is stuck or dead"
                    ),
                    spin=spin_for(tensor.nbytes),
                )
            if staged:
                self.pool.put(tensor)
        self._sends.clear()


def allreduce_(comm, tensor: torch.Tensor, op=None, timeout: float = 300.0) -> float:
    """In-place sum (or op) over `comm`; return the seconds spent waiting.

    16-bit floats are reduced in float32: the pip Open MPI returns garbage for bf16 sums without
    an error (FIELD-NOTES.md). The non-blocking form lets a rank that arrives early sleep
    instead of spinning a core that a working rank needs.
    """
    op = op or MPI.SUM
    if comm.Get_size() == 1:
        return 0.0
    if tensor.dtype in _BIT_VIEWS:
        wide = tensor.float()
        waited = allreduce_(comm, wide, op, timeout)
        tensor.copy_(wide)
        return waited
    work = tensor if tensor.device.type == "cpu" and tensor.is_contiguous() else tensor.cpu()
    request = comm.Iallreduce(MPI.IN_PLACE, _message(work), op=op)
    waited = wait_politely(
        request,
        time.monotonic() + timeout,
        lambda: (
            f"a reduction over {comm.Get_size()} ranks did not finish within {timeout:.0f} s; "
            "a rank is stuck or dead"
        ),
    )
    if work is not tensor:
        tensor.copy_(work)
    return waited


def allgather(comm, tensor: torch.Tensor, timeout: float = 300.0) -> torch.Tensor:
    """Every rank's `tensor` (same shape everywhere) stacked along a new dim 0, in rank order.

    Moves bytes only (no reduction), so 16-bit floats are fine; waits politely as allreduce_.
    """
    work = tensor.detach().cpu().contiguous()
    out = torch.empty((comm.Get_size(), *work.shape), dtype=work.dtype)
    request = comm.Iallgather(_message(work), _message(out))
    wait_politely(
        request,
        time.monotonic() + timeout,
        lambda: f"an allgather over {comm.Get_size()} ranks did not finish within {timeout:.0f} s",
    )
    return out.to(tensor.device)


def broadcast_(comm, tensor: torch.Tensor, root: int = 0, timeout: float = 300.0) -> None:
    """In place: `root`'s tensor on every rank of `comm` (waits politely as allreduce_)."""
    if comm.Get_size() == 1:
        return
    work = tensor.detach().cpu().contiguous()
    request = comm.Ibcast(_message(work), root=root)
    wait_politely(
        request,
        time.monotonic() + timeout,
        lambda: f"a broadcast over {comm.Get_size()} ranks did not finish within {timeout:.0f} s",
    )
    if work.data_ptr() != tensor.data_ptr():
        tensor.copy_(work)
