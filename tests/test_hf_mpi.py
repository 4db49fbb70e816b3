"""Hugging Face interop under mpiexec: --init-from on parallel layouts and through the CLI,
configuration errors on every rank, and `hpcpipe train` checkpoints exported with
`ckpt export --format hf` that transformers loads (one MPI launch: tests/mpi/hf_cases.py)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from mpirun import run_mpi
from safetensors import safe_open

transformers = pytest.importorskip(
    "transformers", reason="Hugging Face interop tests need transformers (pip install -e .[test])"
)
from test_hf import hf_gpt2, hf_llama, rel, rmsnorm_in_input_dtype  # noqa: E402

from hpcpipe.checkpoint import hf  # noqa: E402
from hpcpipe.cli.main import main as cli_main  # noqa: E402
from hpcpipe.models import get_spec  # noqa: E402
from hpcpipe.models.api import build_model  # noqa: E402
from hpcpipe.train import init_from  # noqa: E402

CHECKPOINTS = ["gpt2_tied", "gpt2_untied", "llama_untied", "llama_tied"]


@pytest.fixture
def float64_rmsnorm(monkeypatch):
    """LlamaRMSNorm without its float32 cast (see test_hf.rmsnorm_in_input_dtype)."""
    from transformers.models.llama import modeling_llama

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", rmsnorm_in_input_dtype)


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    work = tmp_path_factory.mktemp("hf_mpi")
    hf_gpt2(work / "gpt2_hf", vocab_size=257)  # odd: tp=2 pads the vocabulary by one row
    hf_llama(work / "llama_hf", vocab_size=259)
    shutil.copytree(work / "llama_hf", work / "bad_rope")
    config = json.loads((work / "bad_rope" / hf.CONFIG).read_text())
    config["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0}
    (work / "bad_rope" / hf.CONFIG).write_text(json.dumps(config))
    out = work / "results.json"
    proc = run_mpi(2, ["-m", "mpi4py", "tests/mpi/hf_cases.py", str(work), str(out)], 600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work, json.loads(out.read_text())


def ok(runs: list[dict]) -> None:
    for rank, run in enumerate(runs):
        assert run["rc"] == 0, f"rank {rank}: {run['stdout'][-2000:]}{run['stderr'][-2000:]}"


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_init_from_hf_on_parallel_layouts_matches_one_rank(launch, family):
    got = dict(launch[1]["layouts"][family])
    reference = got.pop("1x1x1")
    assert len(reference) == 2 and sorted(got) == ["1x1x2", "1x2x1", "2x1x1"]
    for layout, losses in got.items():
        for step, (a, b) in enumerate(zip(losses, reference, strict=True)):
            assert abs(a - b) <= 1e-10 * abs(b), (layout, step, a, b)


def test_cli_init_from_hf_on_tp2_and_from_a_checkpoint_on_pp2(launch):
    results = launch[1]
    tp2 = results["cli"]["hf_tp2"]
    ok(tp2)
    assert "hpcpipe: initialised from" in tp2[0]["stdout"] and "(28 tensors)" in tp2[0]["stdout"]
    want = results["layouts"]["gpt2"]["1x1x1"][0]
    assert abs(tp2[0]["losses"][0] - want) <= 1e-10 * want
    pp2 = results["cli"]["ckpt_pp2"]
    ok(pp2)
    assert "ck_llama_untied (21 tensors)" in pp2[0]["stdout"]
    want = pp2[0]["reference"]
    assert abs(pp2[0]["losses"][0] - want) <= 1e-10 * want


def test_a_checkpoint_resume_finds_wins_over_init_from(launch):
    runs = launch[1]["cli"]["resume_wins"]
    ok(runs)
    assert "hpcpipe: resumed from" in runs[0]["stdout"]
    assert "initialised from" not in runs[0]["stdout"]
    assert "step     3/3" in runs[0]["stdout"] and "step     1/3" not in runs[0]["stdout"]


@pytest.mark.parametrize(
    "case, message",
    [
        ("disagree", "model.d_model=64 from the config, 32 in {work}/llama_hf/config.json"),
        ("missing", "--init-from {work}/nope: does not exist"),
        ("unsupported", "{work}/bad_rope/config.json: rope_scaling="),
    ],
)
def test_configuration_errors_exit_2_on_every_rank(launch, case, message):
    work, results = launch
    runs = results["errors"][case]
    assert len(runs) == 2
    for rank, run in enumerate(runs):
        assert run["rc"] == 2
        assert f"configuration error (rank {rank})" in run["stderr"]
        assert message.format(work=work) in run["stderr"]


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_exported_checkpoint_gives_hpcpipe_logits_in_transformers(
    launch, tmp_path, name, float64_rmsnorm, capsys
):
    work, results = launch
    ok(results["train"][name])
    ckpt = work / f"ck_{name}"
    out = tmp_path / "hf"
    assert cli_main(["ckpt", "export", str(ckpt), "--format", "hf", "--out", str(out)]) == 0
    assert "step 2" in capsys.readouterr().out
    tied = name.endswith("_tied")
    with safe_open(str(out / hf.WEIGHTS), "pt") as f:
        assert ("lm_head.weight" in f.keys()) is not tied  # noqa: SIM118
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    family = name.split("_")[0]
    kind = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[family]
    assert type(model).__name__ == kind and model.config.tie_word_embeddings is tied
    model = model.double().eval()
    config = init_from.build_config({}, {"train.dtype": "float64"}, ckpt).model
    ours = build_model(get_spec(config.arch), config, dtype=torch.float64)
    assert init_from.load_into_model(ours, config, ckpt) == (20 if tied else 21) + (
        8 if family == "gpt2" else 0
    )
    tokens = torch.randint(0, 256, (3, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ours(tokens)
        got = model(input_ids=tokens).logits
    print(f"{name}: logits rel {rel(got, want):.2e}")
    assert rel(got, want) <= 1e-9
