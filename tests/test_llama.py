"""Serial tests for the Llama family: config, shapes, GQA, rotary, init, stages, tp slicing."""

import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from hpcpipe.config import ConfigError, build_config
from hpcpipe.models import get_spec
from hpcpipe.models.api import (
    build_layer,
    build_model,
    build_stage,
    check_boundaries,
    layer_costs,
)
from hpcpipe.models.llama import SPEC, LlamaConfig
from hpcpipe.models.llama.model import (
    Attention,
    RMSNorm,
    apply_rotary,
    inv_frequencies,
    rotary,
)

torch.set_num_threads(1)

CFG = LlamaConfig(n_layers=3, d_model=32, n_heads=4, n_kv_heads=2, ffn_hidden=48, seq_len=12)
SEED = 7


def tokens(config=CFG, batch=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, config.seq_len), generator=gen)


def hidden(config=CFG, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, config.seq_len, config.d_model, generator=gen, dtype=torch.float64)


# --- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"d_model": 30}, "model.d_model=30 is not divisible by model.n_heads=4"),
        ({"n_kv_heads": 3}, "model.n_kv_heads=3 does not divide model.n_heads=4"),
        ({"d_model": 12}, "head size .* is odd"),
        ({"n_layers": 0}, "model.n_layers must be a positive integer"),
        ({"n_heads": True}, "model.n_heads must be a positive integer"),
        ({"n_kv_heads": -1}, "model.n_kv_heads must be an integer >= 0"),
        ({"ffn_hidden": -4}, "model.ffn_hidden must be an integer >= 0"),
        ({"multiple_of": 0}, "model.multiple_of must be a positive integer"),
        ({"norm_eps": 0.0}, "model.norm_eps must be a finite number > 0"),
        ({"rope_theta": float("inf")}, "model.rope_theta must be a finite number > 0"),
        ({"init_std": -0.1}, "model.init_std must be a finite number > 0"),
        ({"ffn_dim_multiplier": -1.0}, "model.ffn_dim_multiplier must be a finite number >= 0"),
        ({"max_positions": 4}, "model.max_positions=4 is below model.seq_len=12"),
        ({"rope_scaling": "yarn"}, "model.rope_scaling must be one of '', 'llama3'"),
        ({"rope_factor": 0.0}, "model.rope_factor must be a finite number > 0"),
        ({"rope_high_freq_factor": 1.0}, "model.rope_high_freq_factor=1.0 must be above"),
        ({"rope_original_max_positions": 0}, "model.rope_original_max_positions must be a pos"),
    ],
)
def test_config_rejects(changes, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(CFG, **changes)


def test_config_from_model_table():
    config = build_config({"model": {"arch": "llama", "n_kv_heads": 2, "rope_theta": 500000}})
    assert get_spec("llama") is SPEC
    assert isinstance(config.model, LlamaConfig)
    assert config.model.rope_theta == 500000.0 and config.model.kv_heads == 2
    with pytest.raises(ConfigError, match="model.n_kv_heads=3 does not divide"):
        build_config({"model": {"arch": "llama", "n_kv_heads": 3}})
    with pytest.raises(ConfigError, match="unknown key model.mlp_ratio"):
        build_config({"model": {"arch": "llama", "mlp_ratio": 4}})


def test_derived_sizes():
    assert LlamaConfig(n_heads=4).kv_heads == 4  # 0 = one key/value head per query head
    assert CFG.head_dim == 8 and CFG.num_layers == 5 and CFG.hidden == 48
    assert LlamaConfig(seq_len=32).positions == 32
    assert LlamaConfig(seq_len=32, max_positions=128).positions == 128


@pytest.mark.parametrize(
    "d_model, multiple_of, multiplier, expected",
    [
        (4096, 1024, 1.3, 14336),  # Llama 3 8B
        (8192, 4096, 1.3, 28672),  # Llama 3 70B
        (4096, 256, 0.0, 11008),  # Llama 2 7B
        (5120, 256, 0.0, 13824),  # Llama 2 13B
        (128, 256, 0.0, 512),
    ],
)
def test_llama3_ffn_rule(d_model, multiple_of, multiplier, expected):
    config = LlamaConfig(
        d_model=d_model, n_heads=32, multiple_of=multiple_of, ffn_dim_multiplier=multiplier
    )
    assert config.hidden == expected
    assert dataclasses.replace(config, ffn_hidden=100).hidden == 100  # explicit wins


# --- sizes and costs ------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [False, True])
def test_parameter_count(tie):
    config = dataclasses.replace(CFG, tie_embeddings=tie)
    d, v, h, n = config.d_model, config.vocab_size, config.hidden, config.n_layers
    q, kv = config.n_heads * config.head_dim, config.kv_heads * config.head_dim
    block = 2 * d + d * q + 2 * d * kv + q * d + 3 * d * h
    expected = v * d + n * block + d + (0 if tie else d * v)
    model = build_model(SPEC, config, SEED)
    assert sum(p.numel() for p in model.parameters()) == expected
    # per-layer costs count a tied matrix on both sides (each stage stores its copy)
    assert layer_costs(SPEC, config) == [v * d] + [block] * n + [d + d * v]


def test_layer_flops_closed_form():
    d, t, v, h = CFG.d_model, CFG.seq_len, CFG.vocab_size, CFG.hidden
    q, kv = CFG.n_heads * CFG.head_dim, CFG.kv_heads * CFG.head_dim
    block = 2 * (d * q + d * kv + d * kv + q * d + d * h + d * h + h * d) + 4 * t * q
    assert SPEC.layer_flops(CFG) == [0.0] + [float(block)] * CFG.n_layers + [2.0 * d * v]


def test_layer_flops_match_counted_flops():
    """torch's FLOP counter on each layer's forward (math attention: full-window matmuls)."""
    x, counted = tokens(), []
    for index in range(CFG.num_layers):
        layer = build_layer(SPEC, CFG, index, SEED, torch.float64)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            x = layer(x)
        counted.append(counter.get_total_flops() / x[..., 0].numel())
    assert counted == SPEC.layer_flops(CFG)


def test_check_boundaries_passes():
    check_boundaries(SPEC, CFG, batch=2)
    logits = build_model(SPEC, CFG, SEED)(tokens())
    assert logits.shape == (3, CFG.seq_len, CFG.vocab_size)


# --- attention ------------------------------------------------------------------------------


def test_gqa_equals_multi_head_with_duplicated_kv():
    gqa = build_layer(SPEC, CFG, 1, SEED, torch.float64).attn
    mha_config = dataclasses.replace(CFG, n_kv_heads=0)
    with torch.device("meta"):
        mha = Attention(mha_config)
    mha = mha.to_empty(device="cpu").double()
    rep, hd, d = CFG.n_heads // CFG.kv_heads, CFG.head_dim, CFG.d_model
    with torch.no_grad():
        mha.wq.weight.copy_(gqa.wq.weight)
        mha.wo.weight.copy_(gqa.wo.weight)
        for name in ("wk", "wv"):
            # key/value head j serves query heads j*rep..(j+1)*rep-1
            rows = getattr(gqa, name).weight.view(CFG.kv_heads, hd, d)
            getattr(mha, name).weight.copy_(rows.repeat_interleave(rep, 0).reshape(-1, d))
    x = hidden()
    torch.testing.assert_close(gqa(x), mha(x), rtol=1e-13, atol=1e-15)


def test_rotary_dot_product_depends_only_on_relative_position():
    hd, length = 16, 40
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1, 1, hd, generator=gen, dtype=torch.float64).unbind(0)
    cos, sin = rotary(length, hd, 10000.0, q)
    qs = apply_rotary(q.expand(1, length, hd), cos, sin)[0]  # q rotated to every position
    ks = apply_rotary(k.expand(1, length, hd), cos, sin)[0]
    dots = qs @ ks.T  # dots[m, n] = <R_m q, R_n k>
    for offset in (0, 1, 5, -3, 17):
        diag = torch.diagonal(dots, offset)
        # angles are float32 (as Hugging Face's), hence the tolerance
        torch.testing.assert_close(diag, diag[:1].expand_as(diag), rtol=0, atol=1e-5)
    assert torch.equal(dots[0, 0], (q * k).sum())  # position 0 is the identity
    assert not torch.allclose(dots[0, 1], dots[0, 0])


def test_rotary_as_hugging_face():
    """rotate_half convention: feature i pairs with i + head_dim/2, inv_freq in float32."""
    hd, theta, length = 8, 500000.0, 6
    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    freqs = (inv_freq[None, :, None] @ torch.arange(length).float()[None, None, :]).transpose(1, 2)
    emb = torch.cat((freqs, freqs), dim=-1)[0]
    like = torch.zeros((), dtype=torch.float64)
    cos, sin = rotary(length, hd, theta, like)
    assert cos.dtype == torch.float64
    assert torch.equal(cos, emb.cos().double()) and torch.equal(sin, emb.sin().double())
    x = torch.arange(hd, dtype=torch.float64).view(1, 1, 1, hd)
    rotated = apply_rotary(x.expand(1, 1, length, hd), cos, sin)
    half = hd // 2
    expected_first = x[..., :half] * cos[:, :half] - x[..., half:] * sin[:, :half]
    torch.testing.assert_close(rotated[..., :half], expected_first.expand_as(rotated[..., :half]))


@pytest.mark.parametrize(
    "head_dim, theta, factor, low, high, original",
    [
        (128, 500000.0, 8.0, 1.0, 4.0, 8192),  # Llama 3.1 8B/70B
        (64, 500000.0, 32.0, 1.0, 4.0, 8192),  # Llama 3.2 1B
        (8, 500.0, 4.0, 1.0, 4.0, 32),  # test_hf's tiny model
        (16, 10000.0, 2.5, 0.5, 3.0, 100),
    ],
)
def test_llama3_inv_freq_as_transformers(head_dim, theta, factor, low, high, original):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": theta, "factor": factor, "low_freq_factor": low,
            "high_freq_factor": high, "original_max_position_embeddings": original}  # fmt: skip
    hf_config = transformers.LlamaConfig(
        hidden_size=head_dim * 2, num_attention_heads=2, max_position_embeddings=2 * original,
        rope_parameters=rope,
    )  # fmt: skip
    want, attention_scaling = ROPE_INIT_FUNCTIONS["llama3"](hf_config)
    config = LlamaConfig(
        n_layers=1, d_model=head_dim * 2, n_heads=2, rope_theta=theta, rope_scaling="llama3",
        rope_factor=factor, rope_low_freq_factor=low, rope_high_freq_factor=high,
        rope_original_max_positions=original,
    )  # fmt: skip
    got = inv_frequencies(head_dim, theta, llama3=config.llama3_rope)
    assert got.dtype == want.dtype == torch.float32 and torch.equal(got, want)
    assert attention_scaling == 1.0  # cos and sin are not rescaled for llama3
    plain = inv_frequencies(head_dim, theta)
    assert not torch.equal(got, plain) and torch.equal(got[0], plain[0])  # highest kept
    cos, sin = rotary(5, head_dim, theta, torch.zeros((), dtype=torch.float64), config.llama3_rope)
    angles = torch.outer(torch.arange(5).float(), want).repeat(1, 2)
    assert torch.equal(cos, angles.cos().double()) and torch.equal(sin, angles.sin().double())


def test_no_buffers():
    """Rotary tables are computed, not stored: nothing garbage after to_empty, no extra state."""
    model = build_model(SPEC, CFG, SEED)
    assert list(model.buffers()) == []
    assert set(model.state_dict()) == {n for n, _ in model.named_parameters()}


def test_rms_norm_dtypes():
    norm = RMSNorm(8, 1e-5).double()
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
    x = torch.randn(3, 8, dtype=torch.float64) * 1e3
    expected = norm.weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(norm(x), expected, rtol=1e-15, atol=0)  # float64 kept
    half = norm.to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    y32 = xb.float() * torch.rsqrt(xb.float().pow(2).mean(-1, keepdim=True) + 1e-5)
    assert torch.equal(half(xb), half.weight * y32.to(torch.bfloat16))


# --- init and stages ------------------------------------------------------------------------


def test_init_deterministic_per_seed_and_index():
    before = torch.get_rng_state()
    a = build_layer(SPEC, CFG, 2, SEED).state_dict()
    b = build_layer(SPEC, CFG, 2, SEED).state_dict()
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is never drawn from
    assert all(torch.equal(a[k], b[k]) for k in a)
    other_seed = build_layer(SPEC, CFG, 2, SEED + 1).state_dict()
    other_index = build_layer(SPEC, CFG, 1, SEED).state_dict()
    assert not torch.equal(a["attn.wq.weight"], other_seed["attn.wq.weight"])
    assert not torch.equal(a["attn.wq.weight"], other_index["attn.wq.weight"])
    assert torch.equal(a["attn_norm.weight"], torch.ones(CFG.d_model))
    std = a["mlp.w1.weight"].std()
    assert 0.015 < std < 0.025 and a["mlp.w2.weight"].std() < std / 2  # residual scaled


@pytest.mark.parametrize("tie", [False, True])
def test_float64_stages_chain_to_whole_model(tie):
    config = dataclasses.replace(CFG, tie_embeddings=tie)
    whole = build_model(SPEC, config, SEED, torch.float64)
    x = out = tokens(config)
    for piece in (range(0, 2), range(2, 3), range(3, 5)):
        out = build_stage(SPEC, config, piece, SEED, torch.float64)(out)
    assert out.dtype == torch.float64
    assert torch.equal(out, whole(x))
    head = build_layer(SPEC, config, config.num_layers - 1, SEED)
    embed = build_layer(SPEC, config, 0, SEED)
    assert torch.equal(head.lm_head.weight, embed.tok.weight) == tie
    if tie:
        assert whole.layers["4"].lm_head.weight is whole.layers["0"].tok.weight


# --- tensor-parallel plan (no MPI: the reductions are left to the caller) -------------------


def test_tp_check():
    plan = SPEC.tp_plan()
    plan.check(CFG, 2)
    with pytest.raises(ValueError, match=r"model.n_kv_heads=2\) .* parallel.tp=4"):
        plan.check(CFG, 4)
    with pytest.raises(ValueError, match=r"model.n_kv_heads=0 = n_heads\) .* parallel.tp=8"):
        plan.check(dataclasses.replace(CFG, n_kv_heads=0), 8)
    with pytest.raises(ValueError, match="MLP hidden size .* parallel.tp=2"):
        plan.check(dataclasses.replace(CFG, ffn_hidden=49), 2)


def test_tp_attention_slices_sum_to_whole():
    """Each rank's heads (whole key/value groups), summed over ranks, give the full attention."""
    from hpcpipe.parallel.tensor_parallel import TPContext

    class LocalTP(TPContext):
        def allreduce(self, tensor, op=None):  # a partial sum stays partial here
            return tensor.clone()

    size = 2
    x = hidden()
    full = build_layer(SPEC, CFG, 1, SEED, torch.float64)
    partial = torch.zeros_like(x)
    for rank in range(size):
        block = build_layer(SPEC, CFG, 1, SEED, torch.float64)
        specs = SPEC.tp_plan().parallelize(block, 1, CFG, LocalTP(None, rank, size))
        q_rows = CFG.n_heads * CFG.head_dim // size
        assert specs["attn.wq.weight"] == (0, rank * q_rows, CFG.n_heads * CFG.head_dim)
        assert block.attn.wk.weight.shape[0] == CFG.kv_heads * CFG.head_dim // size
        partial += block.attn(x)
    torch.testing.assert_close(partial, full.attn(x), rtol=1e-13, atol=1e-15)
