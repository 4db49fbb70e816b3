"""Point-to-point and reduction checks on 2+ ranks; rank 0 writes {check: ok/message} JSON."""

from __future__ import annotations

import json
import sys

import torch
from mpi4py import MPI

from hpcpipe.parallel.p2p import P2P, P2PTimeout, allreduce_

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.int64]


def ring_roundtrip(p2p: P2P, dtype) -> bool:
    """Each rank sends a known tensor to the next; checks the one from the previous, twice."""
    rank, size = p2p.comm.Get_rank(), p2p.comm.Get_size()
    ok = True
    for step in range(2):  # second pass reuses pooled buffers
        sent = (torch.arange(4 * 6, dtype=torch.float64) * (rank + 1) + step).to(dtype)
        sent = sent.reshape(6, 4).t()  # transposed: must arrive in logical order
        transfer = p2p.irecv((4, 6), dtype, "cpu", (rank - 1) % size, tag=step, what="ring")
        p2p.isend(sent.contiguous(), (rank + 1) % size, tag=step)
        got = p2p.wait(transfer).clone()
        p2p.release(transfer)
        p2p.flush()
        prev = (rank - 1) % size
        expect = (torch.arange(24, dtype=torch.float64) * (prev + 1) + step).to(dtype)
        ok &= torch.equal(got, expect.reshape(6, 4).t().contiguous())
    return ok


def non_contiguous_refused(p2p: P2P) -> bool:
    """A transposed view is sent contiguous (isend copies), never in raw memory order."""
    try:
        from hpcpipe.parallel.p2p import _message

        _message(torch.zeros(3, 4).t())
    except ValueError:
        return True
    return False


def bf16_sum_matches_fp32(comm) -> bool:
    """bf16 sums are done in fp32 (the pip Open MPI corrupts bf16 sums silently)."""
    rank = comm.Get_rank()
    narrow = (torch.tensor([1.5, -2.25, 1024.0, 3.0e-3]) * (rank + 1)).to(torch.bfloat16)
    wide = narrow.float()
    allreduce_(comm, wide)
    allreduce_(comm, narrow)
    return torch.equal(narrow, wide.to(torch.bfloat16))


def timeout_names_the_peer(comm) -> bool:
    """A receive nobody sends ends with a message naming peer and what, not a hang."""
    p2p = P2P(comm, timeout=0.5)
    peer = (comm.Get_rank() + 1) % comm.Get_size()
    transfer = p2p.irecv((2,), torch.float32, "cpu", peer, tag=999, what="the input of 1F0")
    try:
        p2p.wait(transfer)
    except P2PTimeout as exc:
        transfer.request.Cancel()
        transfer.request.Wait()
        return f"from pipeline rank {peer}" in str(exc) and "the input of 1F0" in str(exc)
    return False


def main() -> None:
    comm = MPI.COMM_WORLD
    p2p = P2P(comm, timeout=60)
    checks = {f"ring_{str(d).split('.')[-1]}": ring_roundtrip(p2p, d) for d in DTYPES}
    checks["buffers_reused"] = p2p.pool.allocated <= len(DTYPES)
    checks["non_contiguous_refused"] = non_contiguous_refused(p2p)
    checks["bf16_sum_in_fp32"] = bf16_sum_matches_fp32(comm)
    checks["timeout_names_peer"] = timeout_names_the_peer(comm)
    gathered = comm.gather(checks, root=0)
    if comm.Get_rank() == 0:
        merged = {k: all(g[k] for g in gathered) for k in checks}
        with open(sys.argv[1], "w") as fh:
            json.dump(merged, fh)


if __name__ == "__main__":
    main()
