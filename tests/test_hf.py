"""Hugging Face interop on one process: --init-from an HF folder, export, converters, errors.

Models made by transformers itself (random weights, norms included) are saved with
save_pretrained and loaded through the real path: the config built by init_from.build_config,
a PipelineTrainer on a 1-rank grid (MPI.COMM_SELF), init_from.load_into. Compared in float64.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mpi4py import MPI

transformers = pytest.importorskip(
    "transformers", reason="Hugging Face interop tests need transformers (pip install -e .[test])"
)
from safetensors.torch import load_file, save_file  # noqa: E402 - after the guard

from hpcpipe.checkpoint import hf, store  # noqa: E402
from hpcpipe.cli.main import main as cli_main  # noqa: E402
from hpcpipe.config import ConfigError, build_config  # noqa: E402
from hpcpipe.models import get_spec  # noqa: E402
from hpcpipe.models.api import build_model  # noqa: E402
from hpcpipe.models.llama.model import inv_frequencies  # noqa: E402
from hpcpipe.parallel.grid import Grid, Topology  # noqa: E402
from hpcpipe.train import init_from  # noqa: E402
from hpcpipe.train import state as train_state  # noqa: E402
from hpcpipe.train.trainer import PipelineTrainer, make_blueprint  # noqa: E402

VOCAB = 61
SERIAL = {"train.dtype": "float64", "train.global_batch": 2, "schedule.microbatches": 1}
# Llama 3.1's rope scaling for the tiny head size 8 (theta 500: wavelengths 6.3, 30, 140, 664):
# one kept (< 32 / 4), one interpolated, two divided by the factor (> 32 / 1)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500.0, "factor": 4.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}  # fmt: skip


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random, norms too (weights around 1, so no layer is trivial)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            is_norm_weight = p.dim() == 1 and name.endswith("weight")
            p.copy_(1.0 + 0.3 * noise if is_norm_weight else 0.2 * noise)


def hf_gpt2(folder, dtype=torch.float32, seed=1, save=True, shard="5GB", **config):
    """A GPT2LMHeadModel with random weights, saved with save_pretrained (safetensors)."""
    torch.manual_seed(seed)
    values = dict(n_layer=2, n_embd=32, n_head=4, n_positions=32, vocab_size=VOCAB)
    values.update(activation_function="gelu_new", bos_token_id=None, eos_token_id=None)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**values, **config}))
    randomize(model, seed)
    if save:
        model.to(dtype).save_pretrained(folder, max_shard_size=shard)
    return model


def hf_llama(folder, dtype=torch.float32, seed=2, save=True, shard="5GB", **config):
    """A LlamaForCausalLM (GQA: 4 query heads, 2 key/value heads) with random weights."""
    torch.manual_seed(seed)
    values = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=48, max_position_embeddings=32,
                  vocab_size=VOCAB, rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=None,
                  rope_parameters={"rope_type": "default", "rope_theta": 500.0})  # fmt: skip
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**values, **config}))
    randomize(model, seed)
    if save:
        model.to(dtype).save_pretrained(folder, max_shard_size=shard)
    return model


def rmsnorm_in_input_dtype(self, hidden_states):
    """LlamaRMSNorm.forward without its cast to float32.

    transformers' LlamaRMSNorm normalises in float32 whatever the input dtype, so a float64
    model loses precision there (relative ~1e-7 in the logits); hpcpipe's RMSNorm computes a
    float64 input in float64. For a float64 comparison only that cast is removed: the same
    formula, in the input dtype. (Rotary cos/sin are computed in float32 by both, unpatched.)
    """
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


@pytest.fixture
def float64_rmsnorm(monkeypatch):
    from transformers.models.llama import modeling_llama

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", rmsnorm_in_input_dtype)


def one_rank_trainer(config) -> PipelineTrainer:
    grid = Grid(MPI.COMM_SELF, Topology(1, 1, 1))
    tokens = np.arange(4096) % 256
    return PipelineTrainer(config, grid, make_blueprint(config, 1, data=False), tokens=tokens)


def hf_reference(model, tokens: torch.Tensor, seq_len: int):
    """(loss, logits) transformers computes in float64 on the first seq_len positions.

    NOTE: transformers' own loss (labels=...) casts the logits to float32 first (loss_utils
    ForCausalLMLoss: logits.float()), so the float64 loss is the same cross-entropy of the
    same shifted labels, taken from its float64 logits.
    """
    model = model.double().eval()
    with torch.no_grad():
        out = model(input_ids=tokens, labels=tokens)
    logits = out.logits[:, :seq_len]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    assert abs(out.loss.item() - loss.item()) <= 1e-5 * loss.item()  # theirs, in float32
    return loss.item(), logits


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def tokens_for(seq_len: int, batch: int = 3, seed: int = 5) -> torch.Tensor:
    return torch.randint(
        0, VOCAB, (batch, seq_len + 1), generator=torch.Generator().manual_seed(seed)
    )


def assert_llama3_scaled(m, hf_model=None) -> None:
    """m has LLAMA3's rope scaling, which changes some of its frequencies (and HF's agree)."""
    assert (m.rope_scaling, m.rope_factor, m.rope_original_max_positions) == ("llama3", 4.0, 32)
    scaled = inv_frequencies(m.head_dim, m.rope_theta, llama3=m.llama3_rope)
    plain = inv_frequencies(m.head_dim, m.rope_theta)
    assert (scaled != plain).sum().item() == 3
    if hf_model is not None:
        assert torch.equal(hf_model.model.rotary_emb.inv_freq.float(), scaled)


@pytest.mark.parametrize("family", ["gpt2", "llama", "llama3"])
def test_init_from_hf_gives_the_loss_transformers_computes(tmp_path, family, float64_rmsnorm):
    folder = tmp_path / family
    if family == "gpt2":
        model = hf_gpt2(folder)  # tied, gelu_new
    elif family == "llama":
        model = hf_llama(folder)  # untied, GQA
    else:  # Llama 3.1's rope scaling
        model = hf_llama(folder, max_position_embeddings=64, rope_parameters=LLAMA3)
    seq_len = 16  # shorter than the 32 positions of the HF model
    config = init_from.build_config({}, {**SERIAL, "model.seq_len": seq_len}, folder)
    m = config.model
    if family == "gpt2":
        assert (m.activation, m.tie_embeddings, m.max_positions) == ("gelu_tanh", True, 32)
    else:
        assert (m.n_heads, m.n_kv_heads, m.tie_embeddings, m.rope_theta) == (4, 2, False, 500.0)
        if family == "llama3":
            assert_llama3_scaled(m, model)
        else:
            assert m.rope_scaling == ""
    assert init_from.check_weights(config, folder) == len(init_from.expected_tensors(m))
    trainer = one_rank_trainer(config)
    count = init_from.load_into(trainer, folder)
    assert count == (28 if family == "gpt2" else 21)
    tokens = tokens_for(seq_len)
    want_loss, want_logits = hf_reference(model, tokens, seq_len)
    with torch.no_grad():
        logits = trainer.stages[0](tokens[:, :seq_len])
        loss = get_spec(m.arch).loss(logits, tokens[:, 1:]).item()
    assert logits.dtype == torch.float64
    print(f"{family}: loss rel {abs(loss - want_loss) / want_loss:.2e}, logits rel "
          f"{rel(logits, want_logits):.2e}")  # fmt: skip
    assert abs(loss - want_loss) <= 1e-9 * abs(want_loss)
    assert rel(logits, want_logits) <= 1e-9
    if family == "gpt2":  # the whole position table, not just seq_len rows
        pos = dict(trainer.named_params)["layers.0.pos.weight"]
        assert pos.shape == (32, 32)
        assert torch.equal(pos, model.transformer.wpe.weight.double())


@pytest.mark.parametrize(
    "family, dtype", [("gpt2", torch.float16), ("llama", torch.bfloat16)], ids=["gpt2", "llama"]
)
def test_half_precision_sharded_folder_loads_every_tensor_exactly(tmp_path, family, dtype):
    folder = tmp_path / family
    (hf_gpt2 if family == "gpt2" else hf_llama)(folder, dtype=dtype, shard="20KB")
    assert (folder / hf.INDEX).is_file() and not (folder / hf.WEIGHTS).exists()
    stored = {}
    for shard in folder.glob("*.safetensors"):
        stored.update(load_file(shard))
    assert {t.dtype for t in stored.values()} == {dtype}
    config = init_from.build_config({}, {"model.seq_len": 8}, folder)
    trainer = one_rank_trainer(config)  # float32
    init_from.load_into(trainer, folder)
    converter = hf.converter_for(family)
    names = converter.hf_names(config.model)
    for name, p in trainer.named_params:
        want = converter.from_hf(name, stored[names[name]], config.model).float()
        assert p.dtype == torch.float32 and torch.equal(p.detach(), want), name


def test_gpt2_converter_round_trips_and_regroups_c_attn_per_head():
    conv = hf.converter_for("gpt2")
    model = build_config({"model": {"n_layers": 1, "d_model": 8, "n_heads": 2}}).model
    hd = 4
    hf_w = torch.arange(8 * 24, dtype=torch.float64).reshape(8, 24)  # Conv1D: (in, 3 * d)
    ours = conv.from_hf("layers.1.attn.qkv.weight", hf_w, model)
    assert ours.shape == (24, 8)
    # hpcpipe rows: [q_0, k_0, v_0, q_1, k_1, v_1]; HF columns: [q_0 q_1 | k_0 k_1 | v_0 v_1]
    assert torch.equal(ours[hd : 2 * hd], hf_w[:, 8 : 8 + hd].t())  # k of head 0
    assert torch.equal(ours[3 * hd : 4 * hd], hf_w[:, hd : 2 * hd].t())  # q of head 1
    assert torch.equal(conv.to_hf("layers.1.attn.qkv.weight", ours, model), hf_w)
    bias = torch.arange(24.0)
    back = conv.to_hf(
        "layers.1.attn.qkv.bias", conv.from_hf("layers.1.attn.qkv.bias", bias, model), model
    )
    assert torch.equal(back, bias)
    names = conv.hf_names(model)
    assert names["layers.1.mlp.fc.weight"] == "transformer.h.0.mlp.c_fc.weight"
    assert names["layers.2.lm_head.weight"] == "lm_head.weight"
    assert len(names) == len(init_from.expected_tensors(model)) + 1  # + the tied lm_head


def init_from_name(trainer, name: str) -> str:
    """The name a parameter is stored under (a tied copy's group source)."""
    return trainer.canonical.get(name, name)


def save_hpcpipe_checkpoint(root, model: dict) -> str:
    """A 1-rank hpcpipe run's checkpoint after one step (float64)."""
    config = build_config(
        {"model": model, "train": {"global_batch": 2, "dtype": "float64"},
         "schedule": {"microbatches": 1}, "checkpoint": {"dir": str(root)}}
    )  # fmt: skip
    trainer = one_rank_trainer(config)
    trainer.train_step()
    return train_state.save(trainer, root)


def test_export_sharded_then_init_from_it_gives_the_same_weights(tmp_path, capsys):
    model = {"arch": "llama", "n_layers": 2, "d_model": 16, "n_heads": 4, "n_kv_heads": 2,
             "ffn_hidden": 24, "seq_len": 8, "tie_embeddings": True}  # fmt: skip
    step_dir = save_hpcpipe_checkpoint(tmp_path / "run", model)
    out = tmp_path / "hf"
    _, count = hf.export(step_dir, out, max_shard_bytes=4096)
    assert count == 2 * 9 + 2  # tied: no lm_head.weight
    index = json.loads((out / hf.INDEX).read_text())
    assert "lm_head.weight" not in index["weight_map"]
    assert len(set(index["weight_map"].values())) > 1
    config_json = json.loads((out / hf.CONFIG).read_text())
    assert config_json["tie_word_embeddings"] is True
    assert config_json["torch_dtype"] == "float64"
    # and back: --init-from the exported folder holds exactly the checkpoint's weights
    config = init_from.build_config({}, SERIAL, out)
    saved = init_from.build_config({}, SERIAL, step_dir).model
    assert config.model == dataclasses.replace(saved, max_positions=8)  # 0 meant seq_len = 8
    trainer = one_rank_trainer(config)
    init_from.load_into(trainer, out)
    reference = one_rank_trainer(config)
    train_state.restore(reference, step_dir)
    for (name, p), (_, q) in zip(trainer.named_params, reference.named_params, strict=True):
        assert torch.equal(p, q), name
    # the CLI: --format hf with --dtype; the default format is still a torch state dict
    assert cli_main(["ckpt", "export", str(step_dir), "--format", "hf", "--out",
                     str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0  # fmt: skip
    assert "Hugging Face folder" in capsys.readouterr().out
    tensors = load_file(tmp_path / "bf16" / hf.WEIGHTS)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16" / hf.CONFIG).read_text())["torch_dtype"] == "bfloat16"
    assert cli_main(["ckpt", "export", str(step_dir), "--out", str(tmp_path / "m.pt")]) == 0
    assert "layers.0.tok.weight" in torch.load(tmp_path / "m.pt")


@pytest.mark.parametrize("rope", ["plain", "llama3"])
def test_exported_llama_gives_hpcpipe_logits_in_transformers(tmp_path, rope, float64_rmsnorm):
    model = {"arch": "llama", "n_layers": 2, "d_model": 32, "n_heads": 4, "n_kv_heads": 2,
             "ffn_hidden": 48, "seq_len": 8, "max_positions": 64, "rope_theta": 500.0}  # fmt: skip
    if rope == "llama3":
        model.update(rope_scaling="llama3", rope_factor=4.0, rope_low_freq_factor=1.0,
                     rope_high_freq_factor=4.0, rope_original_max_positions=32)  # fmt: skip
    step_dir = save_hpcpipe_checkpoint(tmp_path / "run", model)
    out = tmp_path / "hf"
    hf.export(step_dir, out)
    rope_parameters = json.loads((out / hf.CONFIG).read_text())["rope_parameters"]
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).double().eval()
    assert hf_model.config.rope_parameters == rope_parameters
    config = init_from.build_config({}, {"train.dtype": "float64"}, step_dir).model
    if rope == "llama3":
        assert rope_parameters == LLAMA3
        assert_llama3_scaled(config, hf_model)
        # and back: --init-from the exported folder gives the same [model] keys
        assert init_from.build_config({}, {**SERIAL, "model.seq_len": 8}, out).model == config
    else:
        assert rope_parameters == {"rope_type": "default", "rope_theta": 500.0}
    ours = build_model(get_spec("llama"), config, dtype=torch.float64)
    assert init_from.load_into_model(ours, config, step_dir) == 21
    tokens = torch.randint(0, 256, (3, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ours(tokens)
        got = hf_model(input_ids=tokens).logits
    print(f"{rope}: logits rel {rel(got, want):.2e}")
    assert rel(got, want) <= 1e-9


# ---------------------------------------------------------------- errors


def config_only(folder, **changes) -> None:
    """Rewrite a folder's config.json with some keys changed."""
    path = folder / hf.CONFIG
    values = json.loads(path.read_text())
    path.write_text(json.dumps({**values, **changes}))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    hf_gpt2(root / "gpt2")
    hf_llama(root / "llama")
    return root


def test_a_user_key_must_agree_with_the_folder(folders):
    where = folders / "llama" / hf.CONFIG
    with pytest.raises(ConfigError) as err:
        init_from.build_config({"model": {"d_model": 64}}, {}, folders / "llama")
    assert f"model.d_model=64 from the config, 32 in {where}" in str(err.value)
    with pytest.raises(ConfigError, match="model.tie_embeddings=true from the config, false in"):
        init_from.build_config({}, {"model.tie_embeddings": True}, folders / "llama")
    with pytest.raises(ConfigError, match="model_type 'llama'.*model.arch='gpt2'"):
        init_from.build_config({}, {"model.arch": "gpt2"}, folders / "llama")
    # agreeing keys, the same value spelt otherwise, and seq_len (shorter) are fine
    config = init_from.build_config(
        {"model": {"d_model": 32, "n_heads": 4, "ffn_hidden": 48, "seq_len": 8}},
        {"model.norm_eps": "1e-05", "model.arch": "llama"},
        folders / "llama",
    )
    assert (config.model.seq_len, config.model.max_positions) == (8, 32)
    with pytest.raises(ConfigError, match="max_positions=32 is below model.seq_len=64"):
        init_from.build_config({}, {"model.seq_len": 64}, folders / "llama")


def test_hub_llama31_rope_scaling_maps_to_the_model_keys():
    """Llama 3.1's config.json on the hub: rope_scaling beside a top-level rope_theta."""
    conv = hf.converter_for("llama")
    hub = {"hidden_size": 64, "num_attention_heads": 4, "max_position_embeddings": 131072,
           "rope_theta": 500000.0, "rope_scaling": {
               "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}  # fmt: skip
    keys = conv.config_from_hf(hub)
    want = {"rope_theta": 500000.0, "rope_scaling": "llama3", "rope_factor": 8.0,
            "rope_low_freq_factor": 1.0, "rope_high_freq_factor": 4.0,
            "rope_original_max_positions": 8192}  # fmt: skip
    assert {k: keys[k] for k in want} == want
    model = build_config({"model": {**keys, "seq_len": 16}}).model
    assert conv.config_to_hf(model)["rope_parameters"] == {
        "rope_type": "llama3", **{k: v for k, v in hub["rope_scaling"].items() if k != "rope_type"},
        "rope_theta": 500000.0,
    }  # fmt: skip
    assert conv.config_from_hf(conv.config_to_hf(model)) == {**keys, "seq_len": 131072}
    plain = conv.config_from_hf({**hub, "rope_scaling": None})
    assert plain["rope_scaling"] == "" and "rope_factor" not in plain


def test_equivalent_spelling_agrees(tmp_path):
    hf_llama(tmp_path / "mha", num_key_value_heads=4)
    config = init_from.build_config({}, {"model.n_kv_heads": 0}, tmp_path / "mha")
    assert config.model.kv_heads == 4


@pytest.mark.parametrize(
    "family, changes, message",
    [
        ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=true"),
        ("gpt2", {"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn=true"),
        ("gpt2", {"add_cross_attention": True}, "add_cross_attention=true"),
        ("gpt2", {"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon=1e-06"),
        ("gpt2", {"activation_function": "relu"}, "activation_function='relu'"),
        ("gpt2", {"n_inner": 40}, "n_inner=40 is not a multiple of n_embd=32"),
        (
            "llama",
            {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
            "rope_scaling=",  # (tests/test_hf_mpi.py's bad_rope)
        ),
        (
            "llama",
            {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
            "rope_type 'llama3' needs low_freq_factor, high_freq_factor",
        ),
        (
            "llama",
            {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
            "rope_scaling.rope_type='linear'",
        ),
        ("llama", {"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_type='dynamic'"),
        (
            "llama",
            {"rope_parameters": {**LLAMA3, "partial_rotary_factor": 0.5}},
            "rope_parameters has partial_rotary_factor",
        ),
        (
            "llama",
            {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}},
            "rope_parameters.rope_type='yarn'",
        ),
        ("llama", {"attention_bias": True}, "attention_bias=true"),
        ("llama", {"mlp_bias": True}, "mlp_bias=true"),
        ("llama", {"hidden_act": "gelu"}, 'hidden_act="gelu"'),
        ("llama", {"head_dim": 16}, "head_dim=16"),
        ("llama", {"model_type": "mistral"}, "model_type 'mistral'"),
    ],
)
def test_unsupported_hf_features_are_named(folders, tmp_path, family, changes, message):
    folder = tmp_path / family
    shutil.copytree(folders / family, folder)
    config_only(folder, **changes)
    with pytest.raises(ConfigError) as err:
        init_from.build_config({}, {}, folder)
    assert message in str(err.value)
    assert str(folder) in str(err.value)


def test_missing_or_unreadable_sources(folders, tmp_path):
    with pytest.raises(ConfigError, match="nope: does not exist; give an hpcpipe checkpoint"):
        init_from.build_config({}, {}, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="neither a step directory nor a run root"):
        init_from.build_config({}, {}, tmp_path / "empty")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(folders / "gpt2" / hf.CONFIG, pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match="pytorch_model.bin: PyTorch pickles are not read"):
        init_from.build_config({}, {}, pickled)


def test_missing_or_misshapen_tensors_are_found_from_the_headers(folders, tmp_path):
    folder = tmp_path / "gpt2"
    shutil.copytree(folders / "gpt2", folder)
    tensors = load_file(folder / hf.WEIGHTS)
    config = init_from.build_config({}, {}, folder)
    del tensors["transformer.h.1.mlp.c_fc.bias"]
    save_file(tensors, folder / hf.WEIGHTS, metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="no tensor 'transformer.h.1.mlp.c_fc.bias'"):
        init_from.check_weights(config, folder)
    tensors["transformer.h.1.mlp.c_fc.bias"] = torch.zeros(7)
    save_file(tensors, folder / hf.WEIGHTS, metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"shape \(7,\).*needs \(128,\)"):
        init_from.check_weights(config, folder)


def test_hpcpipe_checkpoint_gives_the_model_section(tmp_path):
    model = {"n_layers": 1, "d_model": 16, "n_heads": 2, "seq_len": 8}
    step_dir = save_hpcpipe_checkpoint(tmp_path / "run", model)
    config = init_from.build_config({}, {**SERIAL, "model.seq_len": 4}, tmp_path / "run")
    assert (config.model.d_model, config.model.seq_len, config.model.max_positions) == (16, 4, 8)
    assert init_from.check_weights(config, step_dir) == 16  # tok, pos, 12 in the block, ln_f
    trainer = one_rank_trainer(config)
    assert init_from.load_into(trainer, step_dir) == 16
    _, saved = store.full_tensors(step_dir, keep=lambda n: not n.startswith("optim."))
    for name, p in trainer.named_params:
        assert torch.equal(p, saved[init_from_name(trainer, name)]), name
    with pytest.raises(ConfigError, match=r"model.n_heads=4 from the config, 2 in .*manifest.json"):
        init_from.build_config({"model": {"n_heads": 4}}, {}, step_dir)


def test_checkpoint_hf_imports_no_model_family():
    code = (
        "import sys, hpcpipe.checkpoint.hf; "
        "print([m for m in sys.modules if m.startswith(('hpcpipe.models.gpt2', "
        "'hpcpipe.models.llama'))])"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
