"""Validation loss through the pipeline (the forward-only schedule) equals the single-process
evaluation in float64, at every evaluation step of a short run, on every layout below.

One mpiexec of 4 ranks runs every case (tests/mpi/eval_cases.py; layouts of 2 ranks on a
sub-communicator); `hpcpipe eval` then reads the checkpoint it left, on 1 and 2 ranks.
"""

import json
import subprocess
import sys

import pytest
from mpirun import ROOT, run_mpi

TOLERANCE = 1e-10
CASES = ["pp2-1f1b", "pp4-1f1b", "dp2tp2-1f1b", "pp2-interleaved", "pp4-interleaved-zb",
         "llama-dp2pp2-zb-h1", "llama-pp2tp2-1f1b"]  # fmt: skip


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    work = tmp_path_factory.mktemp("eval")
    out = work / "results.json"
    proc = run_mpi(4, ["-m", "mpi4py", "tests/mpi/eval_cases.py", str(work), str(out)], 600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", CASES)
def test_val_loss_equals_single_process_at_every_evaluation(results, case):
    r = results[case]
    assert r["steps"] == r["oracle_steps"] == [2, 4, 5]  # every 2 steps and after the last
    assert r["val_rel"] <= TOLERANCE
    assert r["loss_rel"] <= TOLERANCE
    assert r["ppl_ok"]


@pytest.mark.parametrize("case", CASES)
def test_evaluation_holds_no_activations_for_backward(results, case):
    """The runtime's count stays <= 1 on every rank, nothing is left once it is done, and
    the training sampler has not moved."""
    r = results[case]
    assert r["peaks"] == [1] * len(r["peaks"])
    assert r["kept"] == [0] * len(r["kept"])
    assert r["sampler_untouched"]


def test_resume_with_evaluation_is_exact(results):
    """Stopped at step 3 and resumed: losses and val_losses are the uninterrupted run's bits;
    the same run without evaluation trains the same bits."""
    r = results["resume"]
    assert r["resumed"] == r["whole"]
    assert [step for step, _, val in r["whole"] if val is not None] == [2, 4, 6]
    assert [loss for _, loss, _ in r["whole"]] == r["plain_losses"]


@pytest.mark.parametrize("ranks, flags", [(1, []), (2, ["--pp", "2"])])
def test_hpcpipe_eval_gives_the_logged_val_loss(results, ranks, flags):
    """The checkpoint of the pp=4 run at its last step: `hpcpipe eval` on 1 and 2 ranks gives
    the val_loss that run logged there (and the oracle's)."""
    cli = results["cli"]
    args = ["-m", "hpcpipe", "eval", "--checkpoint", cli["checkpoint"], "--format", "json"]
    if ranks == 1:  # no launcher: one process
        proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)  # fmt: skip
    else:
        proc = run_mpi(ranks, [*args, *flags], 300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    out = json.loads(line)
    logged = results["pp4-1f1b"]["val_loss"]["5"]
    assert out["step"] == 5 and out["layout"]["pp"] == ranks
    assert abs(out["val_loss"] - logged) <= TOLERANCE * logged
    assert abs(out["val_loss"] - cli["val_loss"]) <= TOLERANCE * logged
