"""Parameters and FLOPs against closed forms derived here, devices, and the peak_tflops key.

Notation: l blocks, h = d_model, V = vocab_size, s = seq_len, B sequences per step. Every
expected value is written out in the test from the architecture, never read from flops.py.
"""

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from hpcpipe.config import DTYPES, ConfigError, load_config
from hpcpipe.models.api import build_layer
from hpcpipe.models.gpt2 import SPEC as GPT2
from hpcpipe.models.gpt2 import GPT2Config
from hpcpipe.models.llama import SPEC as LLAMA
from hpcpipe.models.llama import LlamaConfig
from hpcpipe.plan import devices, flops
from hpcpipe.plan.devices import DEVICES, device_by_name, device_for_cuda_name, known_peak_tflops
from hpcpipe.train.loop import format_record, model_flops_and_peak

GPT2_SHAPES = [  # (l, h, heads, V, s)
    (2, 32, 2, 256, 16),
    (3, 64, 4, 100, 24),
    (12, 768, 12, 50257, 1024),  # GPT-2 small
]
LLAMA_SHAPES = [  # (l, h, heads, kv_heads, ffn_hidden, V, s)
    (2, 32, 4, 0, 48, 256, 16),  # multi-head: kv_heads = heads
    (3, 64, 8, 2, 96, 300, 12),  # grouped-query
    (2, 64, 4, 1, 0, 128, 8),  # multi-query, Llama 3's derived MLP width
]


def gpt2(l, h, heads, V, s, **keys):
    return GPT2Config(n_layers=l, d_model=h, n_heads=heads, vocab_size=V, seq_len=s, **keys)


def llama(l, h, heads, kv, f, V, s, **keys):
    return LlamaConfig(n_layers=l, d_model=h, n_heads=heads, n_kv_heads=kv, ffn_hidden=f,
                       vocab_size=V, seq_len=s, **keys)  # fmt: skip


def llama_widths(config):
    """(q, kv, f): query width, key/value width, MLP width, worked out from the keys."""
    head_dim = config.d_model // config.n_heads
    kv_heads = config.n_kv_heads or config.n_heads
    f = config.ffn_hidden
    if not f:  # Llama 3: 2/3 of 4h, times the multiplier, rounded up to multiple_of
        f = int(2 * 4 * config.d_model / 3)
        if config.ffn_dim_multiplier:
            f = int(config.ffn_dim_multiplier * f)
        f = -(-f // config.multiple_of) * config.multiple_of
    return config.n_heads * head_dim, kv_heads * head_dim, f


# --- parameters -------------------------------------------------------------------------------


@pytest.mark.parametrize("l, h, heads, V, s", GPT2_SHAPES)
def test_gpt2_params_are_megatrons_count_plus_the_final_layernorm(l, h, heads, V, s):
    # per block: qkv 3h^2 + 3h, proj h^2 + h, fc 4h^2 + 4h, fc2 4h^2 + h, two LayerNorms 4h
    # = 12h^2 + 13h; embedding (V + s)h; head: final LayerNorm 2h, its matrix tied to tok
    megatron = 12 * l * h * h * (1 + 13 / (12 * h) + (V + s) / (12 * l * h))
    exact = 12 * l * h * h + 13 * l * h + (V + s) * h + 2 * h
    assert exact == pytest.approx(megatron + 2 * h, rel=1e-12)
    assert flops.param_count(GPT2, gpt2(l, h, heads, V, s)) == exact
    untied = gpt2(l, h, heads, V, s, tie_embeddings=False)
    assert flops.param_count(GPT2, untied) == exact + V * h


def test_gpt2_small_has_its_published_124m_parameters():
    assert flops.param_count(GPT2, gpt2(*GPT2_SHAPES[-1])) == 124_439_808


@pytest.mark.parametrize("shape", LLAMA_SHAPES)
@pytest.mark.parametrize("tied", [False, True])
def test_llama_params(shape, tied):
    config = llama(*shape, tie_embeddings=tied)
    l, h, V = config.n_layers, config.d_model, config.vocab_size
    q, kv, f = llama_widths(config)
    # per block: wq, wo 2hq; wk, wv 2h kv; w1, w3, w2 3hf; two RMSNorms 2h
    block = 2 * h * q + 2 * h * kv + 3 * h * f + 2 * h
    expected = l * block + V * h + h + (0 if tied else V * h)  # embedding, final norm, head
    assert flops.param_count(LLAMA, config) == expected


def test_llama3_shapes_have_their_published_parameter_counts():
    llama3_8b = LlamaConfig(n_layers=32, d_model=4096, n_heads=32, n_kv_heads=8,
                            vocab_size=128256, multiple_of=1024,
                            ffn_dim_multiplier=1.3)  # fmt: skip
    assert llama_widths(llama3_8b)[2] == 14336
    assert flops.param_count(LLAMA, llama3_8b) == 8_030_261_248
    llama32_1b = LlamaConfig(n_layers=16, d_model=2048, n_heads=32, n_kv_heads=8,
                             vocab_size=128256, ffn_dim_multiplier=1.5,
                             tie_embeddings=True)  # fmt: skip
    assert flops.param_count(LLAMA, llama32_1b) == 1_235_814_400


# --- FLOPs ------------------------------------------------------------------------------------


def gpt2_model_flops(config, B):
    """Megatron's 72 B s l h^2 (1 + s/6h + V/12hl) (Narayanan et al. 2021, mlp_ratio 4), plus
    the position add the family counts in its embedding: h per token, 3Bsh with backward."""
    l, h, V, s = config.n_layers, config.d_model, config.vocab_size, config.seq_len
    return 72 * B * s * l * h * h * (1 + s / (6 * h) + V / (12 * h * l)) + 3 * B * s * h


def llama_model_flops(config, B):
    """Per token per block 2(2hq + 2h kv + 3hf) + 4sq, head 2hV; times Bs tokens, times 3."""
    l, h, V, s = config.n_layers, config.d_model, config.vocab_size, config.seq_len
    q, kv, f = llama_widths(config)
    block = 2 * (2 * h * q + 2 * h * kv + 3 * h * f) + 4 * s * q
    return 3 * B * s * (l * block + 2 * h * V)


@pytest.mark.parametrize("l, h, heads, V, s", GPT2_SHAPES)
@pytest.mark.parametrize("B", [1, 8])
def test_gpt2_model_flops_are_megatrons_formula(l, h, heads, V, s, B):
    config = gpt2(l, h, heads, V, s)
    expected = gpt2_model_flops(config, B)
    assert flops.model_flops_per_step(GPT2, config, B) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("shape", LLAMA_SHAPES)
def test_llama_model_flops_closed_form(shape):
    config = llama(*shape)
    expected = llama_model_flops(config, 4)
    assert flops.model_flops_per_step(LLAMA, config, 4) == pytest.approx(expected, rel=1e-12)


def test_tied_or_not_the_head_costs_the_same_flops():
    tied, untied = gpt2(*GPT2_SHAPES[0]), gpt2(*GPT2_SHAPES[0], tie_embeddings=False)
    assert flops.model_flops_per_step(GPT2, tied, 8) == flops.model_flops_per_step(GPT2, untied, 8)


@pytest.mark.parametrize("spec, config", [(GPT2, gpt2(2, 32, 2, 100, 12)),
                                          (LLAMA, llama(2, 32, 4, 2, 40, 100, 12))])  # fmt: skip
def test_layer_flops_are_what_torch_counts_in_a_forward(spec, config):
    """torch's FLOP counter (GEMMs and math attention over the full window) on each layer of
    one micro-batch; GPT-2's embedding also counts its position add, which torch does not."""
    microbatch = 3
    x = torch.randint(0, config.vocab_size, (microbatch, config.seq_len))
    counted = []
    for index in range(spec.num_layers(config)):
        layer = build_layer(spec, config, index, 0, torch.float64)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            x = layer(x)
        counted.append(float(counter.get_total_flops()))
    if spec is GPT2:
        counted[0] += microbatch * config.seq_len * config.d_model
    assert flops.layer_forward_flops(spec, config, microbatch) == counted


def test_tensor_parallel_ranks_share_every_layers_flops():
    config = llama(*LLAMA_SHAPES[1])
    whole = flops.layer_forward_flops(LLAMA, config, 2)
    assert flops.layer_forward_flops(LLAMA, config, 2, tp=4) == [f / 4 for f in whole]


def test_a_family_without_layer_flops_is_told_to_supply_them():
    spec = dataclasses.replace(GPT2, name="mine", layer_flops=None)
    with pytest.raises(ValueError, match="'mine'.*must supply ModelSpec.layer_flops"):
        flops.model_flops_per_step(spec, gpt2(*GPT2_SHAPES[0]), 8)


@pytest.mark.parametrize("l, h, heads, V, s", GPT2_SHAPES[:2])
def test_full_recompute_runs_every_layer_forward_once_more(l, h, heads, V, s):
    config, B = gpt2(l, h, heads, V, s), 8
    # Megatron's 96 B s l h^2 (1 + s/6h + V/16hl) leaves the head out of the recomputation;
    # hpcpipe's runtime recomputes each stage's whole forward, the last stage's head included
    expected = 96 * B * s * l * h * h * (1 + s / (6 * h) + V / (12 * h * l)) + 4 * B * s * h
    for spelling in ("full", True, "on"):
        got = flops.hardware_flops_per_step(GPT2, config, B, spelling)
        assert got == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("spec, config", [(GPT2, gpt2(*GPT2_SHAPES[1])),
                                          (LLAMA, llama(*LLAMA_SHAPES[1]))])  # fmt: skip
def test_selective_recompute_adds_only_the_attention_matmuls(spec, config):
    B, s, l = 8, config.seq_len, config.n_layers
    q = config.n_heads * config.head_dim
    model = flops.model_flops_per_step(spec, config, B)
    # q @ k^T and att @ v: 2 s q FLOPs each per token, once more in every block
    expected = model + l * B * s * 4 * s * q
    got = flops.hardware_flops_per_step(spec, config, B, "selective")
    assert got == pytest.approx(expected, rel=1e-12)
    assert flops.hardware_flops_per_step(spec, config, B, "false") == model
    assert flops.hardware_flops_per_step(spec, config, B, False) == model


def test_unknown_recompute_mode_is_refused():
    with pytest.raises(ConfigError, match="not a recompute mode"):
        flops.hardware_flops_per_step(GPT2, gpt2(*GPT2_SHAPES[0]), 8, "some")


# --- the throughput a metrics record carries ----------------------------------------------------


def test_rank_throughput_is_model_flops_per_second_per_rank_over_the_peak():
    got = flops.rank_throughput(6e12, step_time=0.5, world_size=4, peak_tflops=10.0)
    assert got == {"tflops_per_rank": 3.0, "mfu": 0.3}
    assert flops.rank_throughput(6e12, 0.5, 4, None) == {"tflops_per_rank": 3.0, "mfu": None}
    assert flops.rank_throughput(None, 0.5, 4, 10.0) == {"tflops_per_rank": None, "mfu": None}


def test_progress_line_shows_tflops_and_mfu_when_known():
    record = {"step": 7, "loss": 3.25, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 1000.0,
              "bubble": 0.25, "step_time": 0.05, "tflops_per_rank": 123.456,
              "mfu": 0.4123}  # fmt: skip
    line = format_record(record, 60)
    assert "1,000 tok/s | 123 TFLOP/s/rank | mfu 41.2% | bubble" in line
    assert "mfu" not in format_record({**record, "mfu": None}, 60)
    assert "TFLOP/s" not in format_record({**record, "tflops_per_rank": None, "mfu": None}, 60)


def test_run_flops_and_peak_come_from_the_family_and_the_device(monkeypatch):
    def trainer(spec=GPT2, peak=0.0, device="cpu", dtype="float32"):
        config = load_config(None, {"train.peak_tflops": str(peak), "train.dtype": dtype})
        return SimpleNamespace(blueprint=SimpleNamespace(spec=spec), config=config,
                               device=torch.device(device))  # fmt: skip

    B, model = 16, GPT2Config()  # the defaults: train.global_batch 16, the default GPT-2
    step_flops, peak = model_flops_and_peak(trainer())
    assert step_flops == pytest.approx(gpt2_model_flops(model, B), rel=1e-12)
    assert peak is None  # on CPU, unless train.peak_tflops says
    assert model_flops_and_peak(trainer(peak=0.5))[1] == 0.5
    monkeypatch.setattr(devices.torch.cuda, "get_device_name", lambda device: "NVIDIA H200")
    assert model_flops_and_peak(trainer(device="cuda:0", dtype="bfloat16"))[1] == 989.0
    assert model_flops_and_peak(trainer(device="cuda:0", peak=100))[1] == 100.0  # given wins
    no_counts = dataclasses.replace(GPT2, layer_flops=None)
    assert model_flops_and_peak(trainer(spec=no_counts, peak=0.5)) == (None, 0.5)


# --- devices ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DEVICES))
def test_every_device_has_positive_figures_for_every_training_dtype(name):
    device = device_by_name(name)
    assert device.name == name
    numbers = [v for f in dataclasses.fields(device) if f.name not in ("name", "peak_tflops")
               for v in [getattr(device, f.name)]]  # fmt: skip
    assert numbers and all(v > 0 for v in numbers)
    assert set(DTYPES) <= device.peak_tflops.keys()
    assert all(v > 0 for v in device.peak_tflops.values())


def test_datasheet_peaks():
    assert DEVICES["a100-80g"].peak_tflops["bfloat16"] == 312.0
    assert DEVICES["h100-80g"].peak_tflops["bfloat16"] == 989.0
    assert DEVICES["h200"].peak_tflops == DEVICES["h100-80g"].peak_tflops
    assert DEVICES["h200"].memory_bytes == 141e9


def test_unknown_device_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown device 'v100'.*a100-80g, h100-80g, h200"):
        device_by_name("v100")


@pytest.mark.parametrize(
    "cuda_name, entry",
    [
        ("NVIDIA A100-SXM4-80GB", "a100-80g"),
        ("NVIDIA A100-SXM4-40GB", "a100-80g"),  # the same tensor cores
        ("NVIDIA A100 80GB PCIe", "a100-80g"),
        ("NVIDIA H100 80GB HBM3", "h100-80g"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA H100 PCIe", None),  # lower clocks than SXM: its peak is not the table's
        ("NVIDIA H200 NVL", None),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_cuda_device_names_match_the_table(cuda_name, entry):
    found = device_for_cuda_name(cuda_name)
    assert (found.name if found else None) == entry


def test_known_peak_is_the_table_entry_of_the_gpu_and_none_on_cpu(monkeypatch):
    assert known_peak_tflops("cpu", "bfloat16") is None
    monkeypatch.setattr(devices.torch.cuda, "get_device_name", lambda device: "NVIDIA H200")
    assert known_peak_tflops(torch.device("cuda:0"), "bfloat16") == 989.0
    assert known_peak_tflops("cuda", "float32") == 67.0
    monkeypatch.setattr(devices.torch.cuda, "get_device_name", lambda device: "Some GPU")
    assert known_peak_tflops("cuda:0", "bfloat16") is None


# --- the config key ---------------------------------------------------------------------------


def test_peak_tflops_key_parses_and_defaults_to_the_known_peak():
    assert load_config(None).train.peak_tflops == 0.0
    assert load_config(None, {"train.peak_tflops": "312"}).train.peak_tflops == 312.0
    assert load_config(None, {"train.peak_tflops": "0.5"}).train.peak_tflops == 0.5


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_peak_tflops_must_be_finite_and_not_negative(value):
    with pytest.raises(ConfigError, match="train.peak_tflops must be a finite number >= 0"):
        load_config(None, {"train.peak_tflops": value})
