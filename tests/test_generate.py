"""Generation on one process: greedy tokens equal transformers' generate, the key/value cache
equals recomputing the prefix, seeded sampling, the CLI and its errors (float64, nothing
downloaded: models built by transformers from a config, as tests/test_hf.py)."""

from __future__ import annotations

import json

import pytest
import torch
from mpi4py import MPI

transformers = pytest.importorskip(
    "transformers", reason="generation tests compare with transformers (pip install -e .[test])"
)
from test_hf import hf_gpt2, hf_llama, rel, rmsnorm_in_input_dtype, save_hpcpipe_checkpoint  # noqa: E402

from hpcpipe.cli.main import main as cli_main  # noqa: E402
from hpcpipe.config import ConfigError, build_config  # noqa: E402
from hpcpipe.models import get_spec  # noqa: E402
from hpcpipe.models.api import (  # noqa: E402
    DecodeState,
    build_model,
    causal_mask,
    set_decode_state,
    supports_decoding,
)
from hpcpipe.train import generate as gen  # noqa: E402
from hpcpipe.train import init_from  # noqa: E402

PROMPTS = [[1, 2, 3, 4], [5, 6], [7, 8, 9, 10, 11, 12, 13]]  # one micro-batch each
NEW = 8
F64 = {"train.dtype": "float64"}
SAMPLED = gen.Sampling(temperature=1.5, top_k=8, seed=3)


@pytest.fixture(autouse=True)
def float64_rmsnorm(monkeypatch):
    """LlamaRMSNorm without its float32 cast (see test_hf.rmsnorm_in_input_dtype)."""
    from transformers.models.llama import modeling_llama

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", rmsnorm_in_input_dtype)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{family: (HF folder, the transformers model in float64)}."""
    work = tmp_path_factory.mktemp("generate")
    return {
        "gpt2": (work / "gpt2", hf_gpt2(work / "gpt2").double().eval()),  # tied, gelu_new
        "llama": (work / "llama", hf_llama(work / "llama").double().eval()),  # GQA, untied
    }


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
        do_sample=False, pad_token_id=0,
    )  # fmt: skip
    return out[0, len(prompt) :].tolist()


def run(folder, prompts=PROMPTS, n=NEW, sampling=None, kv_cache=True, **overrides):
    config = init_from.build_config({}, {**F64, **overrides}, folder)
    return gen.generate(config, MPI.COMM_SELF, folder, prompts, n, sampling, kv_cache).tokens


def recompute(folder, prompts=PROMPTS, n=NEW, sampling=None) -> list[list[int]]:
    """The whole model on the whole prefix at every step: no cache, no pipeline."""
    sampling = sampling or gen.Sampling()
    config = init_from.build_config({}, F64, folder).model
    model = build_model(get_spec(config.arch), config, dtype=torch.float64)
    init_from.load_into_model(model, config, folder)
    out = []
    for i, prompt in enumerate(prompts):
        seq, g = list(prompt), torch.Generator().manual_seed(sampling.seed + i)
        with torch.no_grad():
            for _ in range(n):
                seq.append(gen.pick(model(torch.tensor([seq]))[0, -1], sampling, g))
        out.append(seq[len(prompt) :])
    return out


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_tokens_equal_transformers_generate(folders, family):
    folder, model = folders[family]
    got = run(folder)
    want = [hf_greedy(model, p, NEW) for p in PROMPTS]
    print(f"{family}: {got}")
    assert got == want
    assert len({tuple(t) for t in got}) == len(PROMPTS)  # not one degenerate answer


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_kv_cache_gives_the_tokens_of_recomputing_the_prefix(folders, family):
    folder, _ = folders[family]
    for sampling in (gen.Sampling(), SAMPLED):
        cached = run(folder, sampling=sampling)
        assert cached == run(folder, sampling=sampling, kv_cache=False)
        assert cached == recompute(folder, sampling=sampling)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("capacity", [0, 16], ids=["concatenated", "preallocated"])
def test_cached_decoding_gives_the_full_forward_logits(arch, capacity):
    spec = get_spec(arch)
    config = spec.config_class(n_layers=2, d_model=32, n_heads=4, seq_len=16, vocab_size=61)
    model = build_model(spec, config, seed=3, dtype=torch.float64)
    tokens = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(tokens)
        state = DecodeState(capacity=lambda m: capacity)
        assert set_decode_state(model, state) == (3 if arch == "gpt2" else 2)
        # a prefill, a chunk after a cached prefix (the explicit mask), then one at a time
        pieces = [(0, 5), (5, 8), (8, 9), (9, 10), (10, 11), (11, 12)]
        outs = []
        for a, b in pieces:
            state.select(0, a)
            outs.append(model(tokens[:, a:b]))
        set_decode_state(model, None)
        assert torch.equal(model(tokens), full)  # no state: training behaviour
    assert rel(torch.cat(outs, dim=1), full) <= 1e-12


def test_causal_mask_for_new_queries_after_a_prefix():
    q, k = torch.zeros(1, 1, 3, 4), torch.zeros(1, 1, 5, 4)
    mask = causal_mask(q, k)["attn_mask"]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert causal_mask(k, k) == {"is_causal": True}
    assert causal_mask(q[:, :, :1], k) == {}


def test_hpcpipe_checkpoint_and_a_family_without_the_cache(tmp_path):
    """An hpcpipe checkpoint generates as its model does; a family without decode_state is
    refused with the cache and generates without it."""
    gpt2 = {"n_layers": 2, "d_model": 16, "n_heads": 2, "seq_len": 16}
    step_dir = save_hpcpipe_checkpoint(tmp_path / "gpt2", gpt2)
    assert run(step_dir) == recompute(step_dir)
    own = {"arch": "examples.own_model:spec", "n_layers": 2, "d_model": 16, "seq_len": 16}
    own_dir = save_hpcpipe_checkpoint(tmp_path / "own", own)
    config = init_from.build_config({}, F64, own_dir)
    assert not supports_decoding(get_spec(config.model.arch), config.model)
    with pytest.raises(ConfigError, match="no module declaring `decode_state`.*--no-kv-cache"):
        gen.generate(config, MPI.COMM_SELF, own_dir, PROMPTS, NEW)
    assert run(own_dir, kv_cache=False) == recompute(own_dir)


def test_seeded_sampling_is_reproducible_and_top_k_restricts(folders):
    folder, _ = folders["gpt2"]
    first = run(folder, sampling=SAMPLED)
    assert first == run(folder, sampling=SAMPLED)
    other = run(folder, sampling=gen.Sampling(temperature=1.5, top_k=8, seed=4))
    assert other != first
    # prompt i draws from seed + i: alone, prompt 1 with seed 4 is prompt 1 of seed 3's batch
    alone = run(folder, prompts=PROMPTS[1:2], sampling=gen.Sampling(1.5, 8, seed=4))
    assert alone == [first[1]]
    assert run(folder, sampling=gen.Sampling(2.0, top_k=1, seed=5)) == run(folder)
    logits = torch.arange(10.0)
    g = torch.Generator().manual_seed(0)
    draws = {gen.pick(logits, gen.Sampling(5.0, top_k=3), g) for _ in range(200)}
    assert draws == {7, 8, 9}


def cli(argv, capsys) -> tuple[int, str, str]:
    rc = cli_main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_json_and_text(folders, tmp_path, capsys):
    folder, _ = folders["llama"]
    argv = ["generate", "--checkpoint", str(folder), "--max-new-tokens", str(NEW), "--dtype",
            "float64", "--format", "json"]  # fmt: skip
    rc, out, err = cli([*argv, "--tokens", "1,2,3,4", "--tokens", "5 6"], capsys)
    assert rc == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [d["tokens"] for d in lines] == run(folder, PROMPTS[:2])
    assert [d["prompt"] for d in lines] == [0, 1]
    assert "2 prompt(s) x 8 new tokens" in err and "tokens/s" in err
    # text through the tokenizer the checkpoint records (none: bytes)
    step_dir = save_hpcpipe_checkpoint(
        tmp_path / "bytes", {"n_layers": 2, "d_model": 16, "n_heads": 2, "seq_len": 32}
    )
    argv = ["generate", "--checkpoint", step_dir, "--max-new-tokens", "6", "--prompt", "def "]
    rc, out, err = cli([*argv, "--format", "json", "--temperature", "0.7", "--seed", "1"], capsys)
    assert rc == 0, err
    record = json.loads(out)
    assert len(record["tokens"]) == 6
    assert record["text"] == bytes(record["tokens"]).decode("utf-8", errors="replace")
    rc, out, err = cli([*argv, "--temperature", "0.7", "--seed", "1"], capsys)
    assert rc == 0, err
    assert out == f"def {record['text']}\n---\n"


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--tokens", ",".join(["1"] * 30)],
            "prompt 0 has 30 tokens, + --max-new-tokens 8 = 38 > model.seq_len=32",
        ),
        ([], "nothing to generate from: give --prompt TEXT or --tokens IDS"),
        (["--tokens", ""], "prompt 0 has no tokens"),
        (["--tokens", "1,x"], "--tokens '1,x': give integer ids"),
        (["--tokens", "1,61"], "prompt 0: token id 61 is outside the model's vocabulary 0..60"),
        (["--tokens", "1", "--temperature", "-1"], "--temperature must be a finite number >= 0"),
        (["--tokens", "1", "--pp", "2"], "pp=2 x tp=1 = 2 ranks, but the job has 1 MPI"),
        (["--tokens", "1", "--parallel.dp=2"], "generation runs one pipeline: parallel.dp must"),
        (["--tokens", "1", "--model.d_model=64"], "model.d_model=64 from the config, 32 in"),
    ],
    ids=[
        "too-long",
        "no-prompt",
        "empty",
        "not-ids",
        "vocab",
        "temperature",
        "world",
        "dp",
        "disagree",
    ],
)
def test_cli_errors_are_clear(folders, capsys, extra, message):
    folder, _ = folders["gpt2"]
    argv = ["generate", "--checkpoint", str(folder), "--max-new-tokens", str(NEW), *extra]
    rc, _, err = cli(argv, capsys)
    assert rc == 2
    assert "hpcpipe generate: configuration error (rank 0):" in err
    assert message in err


def test_max_new_tokens_and_gpt2_positions():
    model = build_config({"model": {"seq_len": 8}}).model
    with pytest.raises(ConfigError, match="--max-new-tokens must be >= 1"):
        gen.check_prompts(model, [[1]], 0)
    gen.check_prompts(model, [[1] * 4], 4)  # exactly seq_len fits
    with pytest.raises(ConfigError, match="raise --model.seq_len"):
        gen.check_prompts(model, [[1] * 4], 5)
