"""Generation on pp in {2, 4}, tp = 2 and pp2 x tp2 equals one process and transformers'
generate, greedy and seeded sampling, with the CLI and its errors on every rank (one MPI
launch of 4 ranks: tests/mpi/generate_cases.py)."""

from __future__ import annotations

import json

import pytest
from mpirun import run_mpi

transformers = pytest.importorskip(
    "transformers", reason="generation tests compare with transformers (pip install -e .[test])"
)
from test_generate import NEW, PROMPTS, SAMPLED, float64_rmsnorm, hf_greedy, run  # noqa: E402, F401
from test_hf import hf_gpt2, hf_llama  # noqa: E402

LAYOUTS = ["pp2", "pp4", "tp2", "pp2tp2"]  # SAMPLED is generate_cases.py's "sampled"


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    work = tmp_path_factory.mktemp("generate_mpi")
    models = {"gpt2": hf_gpt2(work / "gpt2"), "llama": hf_llama(work / "llama")}
    out = work / "results.json"
    proc = run_mpi(4, ["-m", "mpi4py", "tests/mpi/generate_cases.py", str(work), str(out)], 600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work, {k: m.double().eval() for k, m in models.items()}, json.loads(out.read_text())


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_tokens_on_every_layout_equal_one_process_and_transformers(launch, family):
    work, models, results = launch
    one = run(work / family)
    assert one == [hf_greedy(models[family], p, NEW) for p in PROMPTS]
    for layout in LAYOUTS:
        assert results["tokens"][f"{family}/greedy/{layout}"] == one, layout
    for layout in ("pp2", "tp2"):  # recomputing the whole prefix through the pipeline
        assert results["tokens"][f"{family}/greedy/{layout}/no-cache"] == one, layout


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_seeded_sampling_is_the_same_on_every_layout(launch, family):
    work, _, results = launch
    one = run(work / family, sampling=SAMPLED)
    assert one != run(work / family)  # sampling did change the tokens
    for layout in LAYOUTS:
        assert results["tokens"][f"{family}/sampled/{layout}"] == one, layout


def test_cli_on_pp2_tp2_prints_one_json_object_per_prompt_on_rank_0(launch):
    work, _, results = launch
    runs = results["cli"]["json"]
    assert [r["rc"] for r in runs] == [0] * 4, runs[0]["stderr"]
    lines = [json.loads(line) for line in runs[0]["stdout"].splitlines()]
    assert [d["tokens"] for d in lines] == run(work / "gpt2")
    assert all(r["stdout"] == "" for r in runs[1:])
    assert "pp=2 tp=2, float64" in runs[0]["stderr"]


@pytest.mark.parametrize(
    "case, message",
    [
        ("too_long", "prompt 0 has 30 tokens, + --max-new-tokens 8 = 38 > model.seq_len=32"),
        ("world", "pp=2 x tp=1 = 2 ranks, but the job has 4 MPI processes"),
    ],
)
def test_configuration_errors_exit_2_on_every_rank(launch, case, message):
    runs = launch[2]["cli"][case]
    assert len(runs) == 4
    for rank, r in enumerate(runs):
        assert r["rc"] == 2
        assert f"hpcpipe generate: configuration error (rank {rank}): {message}" in r["stderr"]
