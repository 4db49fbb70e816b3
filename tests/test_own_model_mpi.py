"""A model family outside hpcpipe (examples/own_model) trains under mpiexec exactly as serially.

`model.arch = "examples.own_model:spec"` is imported by the registry from the working
directory (the repository root), which neither `python -m mpi4py script.py` nor the `hpcpipe`
console script put on sys.path. Configuration errors about the model end `hpcpipe train` on
every rank with exit code 2 before any communication.
"""

import json
import sys
from pathlib import Path

import pytest
from mpirun import run_mpi

TOLERANCE = 1e-10
ARCH = "--model.arch=examples.own_model:spec"
TINY = ["--model.d_model=16", "--model.n_heads=2", "--model.seq_len=8", "--train.global_batch=4"]
# the console script: its sys.path holds .venv/bin, not the working directory
HPCPIPE = str(Path(sys.executable).parent / "hpcpipe")
CASES = [("1f1b", 1, 3, True), ("1f1b", 1, 2, False), ("gpipe", 1, 3, True),
         ("zb-h1", 1, 4, True), ("interleaved", 2, 4, True)]  # fmt: skip


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    path = tmp_path_factory.mktemp("own") / "cases.json"
    proc = run_mpi(2, ["-m", "mpi4py", "tests/mpi/own_model_cases.py", str(path)], 300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {(r["schedule"], r["virtual"], r["microbatches"], r["tie"]): r for r in json.loads(
        path.read_text())}  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_own_model_pp2_equals_serial(results, case):
    r = results[case]
    assert r["loss_rel"] <= TOLERANCE
    assert r["grad_rel"] <= TOLERANCE
    assert r["norm_rel"] <= TOLERANCE
    assert r["param_rel"] <= TOLERANCE
    assert r["clipped"], "the case must exercise global gradient clipping"
    # the family's own layers, split over both ranks, imported from the repository root
    assert r["kinds_per_rank"] == [["Embedding", "ParallelBlock"], ["Head", "ParallelBlock"]]
    assert not r["cwd_on_path_at_start"]
    assert r["module_file"] == str(Path("examples/own_model/__init__.py").resolve())
    tied = "layers.0.tok.weight" in r["names_per_rank"][0]
    assert tied and any(n.endswith("lm_head.weight") for n in r["names_per_rank"][-1])


def test_console_script_trains_own_model():
    args = [HPCPIPE, "train", ARCH, "--pp", "2", "--steps", "2", "--microbatches", "2", *TINY]
    proc = run_mpi(2, args, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "examples.own_model:spec model, 2 ranks" in proc.stdout
    assert proc.stdout.count("step ") == 2


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--model.arch=gpt3", "--pp", "2"], "unknown model.arch='gpt3'; valid: gpt2, llama"),
        ([ARCH, "--model.n_kv_heads=1", "--pp", "2"],
         "unknown key model.n_kv_heads; [model] of model.arch='examples.own_model:spec' "
         "accepts: arch, d_model, init_std, mlp_ratio, n_heads, n_layers, seq_len, "
         "tie_embeddings, vocab_size"),
        ([ARCH, "--tp", "2"],
         "model.arch='examples.own_model:spec' has no tensor-parallel plan; use parallel.tp=1"),
    ],
    ids=["unknown-arch", "unknown-key", "no-tp-plan"],
)  # fmt: skip
def test_model_errors_end_train_with_code_2(flags, message):
    proc = run_mpi(2, [HPCPIPE, "train", *TINY, *flags], timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    for rank in range(2):
        assert f"hpcpipe: configuration error (rank {rank}): " in proc.stderr
    assert proc.stderr.count(message) == 2
    assert "step " not in proc.stdout
