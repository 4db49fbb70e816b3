"""Point-to-point transfers and reductions between real MPI processes."""

import json

import pytest
import torch
from mpirun import run_mpi

from hpcpipe.parallel.p2p import make_tag, mpi_datatype, ranks_share_cores

CHECKS = [
    "ring_float64",
    "ring_float32",
    "ring_bfloat16",
    "ring_float16",
    "ring_int64",
    "buffers_reused",
    "non_contiguous_refused",
    "bf16_sum_in_fp32",
    "timeout_names_peer",
]


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"{n}ranks")
def checks(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("p2p") / "checks.json"
    proc = run_mpi(request.param, ["-m", "mpi4py", "tests/mpi/p2p_cases.py", str(path)], 300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(path.read_text())


@pytest.mark.parametrize("name", CHECKS)
def test_p2p(checks, name):
    assert checks[name] is True


def test_tags_are_distinct_per_microbatch_stage_direction():
    tags = {
        make_tag(mb, stage, direction, 8, 2**31 - 1)
        for mb in range(64)
        for stage in range(8)
        for direction in (0, 1)
    }
    assert len(tags) == 64 * 8 * 2


def test_every_training_dtype_has_an_mpi_type():
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        assert mpi_datatype(dtype) is not None
    with pytest.raises(TypeError, match="no MPI datatype"):
        mpi_datatype(torch.complex64)


LAUNCHER_COUNTS = ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE")


@pytest.mark.parametrize("key", LAUNCHER_COUNTS)
def test_waiting_ranks_yield_only_when_ranks_outnumber_cores(monkeypatch, key):
    for other in (*LAUNCHER_COUNTS, "HPCPIPE_YIELD"):
        monkeypatch.delenv(other, raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    monkeypatch.setenv(key, "2")
    assert not ranks_share_cores()
    monkeypatch.setenv(key, "4")
    assert ranks_share_cores()


def test_unknown_placement_yields_and_the_user_can_force_it(monkeypatch):
    for key in LAUNCHER_COUNTS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.delenv("HPCPIPE_YIELD", raising=False)
    assert ranks_share_cores()  # the safe side: never starve a rank that shares our core
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "64")
    monkeypatch.setenv("HPCPIPE_YIELD", "0")
    assert not ranks_share_cores()
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "1")
    monkeypatch.setenv("HPCPIPE_YIELD", "1")
    assert ranks_share_cores()
