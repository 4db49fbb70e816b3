"""Checkpoints written by 4 real MPI ranks: resharded loads, and a rank killed mid-save."""

import json

import pytest
import torch
from mpi4py import MPI
from mpirun import run_mpi

from hpcpipe.checkpoint import store as ck
from hpcpipe.checkpoint.format import Shard

CASES = "tests/mpi/checkpoint_cases.py"
CHECKS = [
    "committed_on_every_rank",
    "four_files",
    "load_other_split",
    "verify",
    "writer_false_replicas",
    "failure_reaches_every_rank",
]


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt")
    out = tmp / "checks.json"
    proc = run_mpi(4, ["-m", "mpi4py", CASES, "reshard", str(tmp / "run"), str(out)], 120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("name", CHECKS)
def test_four_ranks(checks, name):
    assert checks[name] is True


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt_kill") / "run"
    proc = run_mpi(4, ["-m", "mpi4py", CASES, "kill", str(root)], 120)
    return proc, root


def test_rank_killed_mid_save_leaves_the_previous_step(killed):
    proc, root = killed
    assert proc.returncode != 0  # rank 2 died by SIGKILL: the job must fail...
    assert "committed although" not in proc.stderr
    assert (root / ".tmp_step_2").is_dir()  # ...after it had started writing step 2
    assert (root / "latest").read_text().strip() == "step_1"
    assert [s for s, _ in ck.list_steps(root)] == [1]
    assert ck.verify(root / "step_1") == []
    assert ck.find_latest_valid(root) == root / "step_1"
    _, got = ck.load_checkpoint(root, [("w", (8, 6), (0, 0), (8, 6))])
    expect = torch.arange(48, dtype=torch.float64).reshape(8, 6) / 7
    assert torch.equal(got["w"], expect)


def test_next_save_cleans_up_after_the_killed_one(killed):
    _, root = killed
    shard = Shard("w", torch.zeros(2), (2,), (0,))
    ck.save_checkpoint(root, 2, MPI.COMM_SELF, [shard], True, "pp0_tp0", {})
    assert not (root / ".tmp_step_2").exists()
    assert ck.resolve(root).name == "step_2" and ck.verify(root) == []
