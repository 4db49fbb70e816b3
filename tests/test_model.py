"""Serial tests for GPT-2 as a family of the model API (layer by layer)."""

import dataclasses
import math

import pytest
import torch
from torch import nn

from hpcpipe.models.api import (
    Stage,
    build_layer,
    build_model,
    build_stage,
    layer_costs,
)
from hpcpipe.models.gpt2 import SPEC, GPT2Config
from hpcpipe.models.gpt2.model import Block, Embedding, Head, loss_fn

CFG = GPT2Config(n_layers=4, d_model=32, n_heads=4, seq_len=16)
SEED = 1234


def tokens(batch=3, t=CFG.seq_len, seed=0):
    """Random token ids from a local generator."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, CFG.vocab_size, (batch, t), generator=gen)


def layer(config, index, seed=SEED, dtype=torch.float32):
    return build_layer(SPEC, config, index, seed, dtype)


def test_layer_kinds():
    kinds = [type(layer(CFG, i)) for i in range(CFG.num_layers)]
    assert CFG.num_layers == CFG.n_layers + 2 == SPEC.num_layers(CFG)
    assert kinds == [Embedding] + [Block] * CFG.n_layers + [Head]


def test_model_equals_layers_one_by_one():
    model = build_model(SPEC, CFG, seed=SEED)
    x = tokens()
    out = x
    for i in range(CFG.num_layers):
        out = layer(CFG, i)(out)
    logits = model(x)
    assert logits.shape == (3, CFG.seq_len, CFG.vocab_size)
    assert torch.equal(logits, out)


@pytest.mark.parametrize("start,stop", [(0, 1), (0, 3), (2, 5), (1, 6), (5, 6), (0, 6)])
def test_stage_matches_model_bit_for_bit(start, stop):
    full = dict(build_model(SPEC, CFG, seed=SEED).named_parameters(remove_duplicate=False))
    stage = build_stage(SPEC, CFG, range(start, stop), seed=SEED)
    assert stage.layer_indices == range(start, stop)
    params = dict(stage.named_parameters(remove_duplicate=False))
    expected = {k for k in full if start <= int(k.split(".")[1]) < stop}
    assert set(params) == expected
    for name, p in params.items():
        assert torch.equal(p, full[name]), name


def test_stages_chain_to_model_output():
    x = tokens()
    ranges = (range(0, 2), range(2, 3), range(3, 6))
    stages = [build_stage(SPEC, CFG, r, seed=SEED) for r in ranges]
    # the first stage takes token ids (holds the embedding), the last produces logits
    assert [s.layer_indices for s in stages] == list(ranges)
    assert isinstance(stages[0].layers["0"], Embedding)
    assert not any(isinstance(m, Embedding) for s in stages[1:] for m in s.layers.values())
    assert isinstance(stages[-1].layers[str(CFG.num_layers - 1)], Head)
    assert not any(isinstance(m, Head) for s in stages[:-1] for m in s.layers.values())
    out = x
    for stage in stages:
        out = stage(out)
    assert torch.equal(out, build_model(SPEC, CFG, seed=SEED)(x))


def test_stage_from_layers():
    model = build_model(SPEC, CFG, seed=SEED)
    stage = Stage({i: model.layers[str(i)] for i in (3, 2, 4)})
    assert stage.layer_indices == range(2, 5)
    assert [n.split(".")[1] for n, _ in stage.named_parameters()][0] == "2"
    with pytest.raises(ValueError, match="contiguous"):
        Stage({1: model.layers["1"], 3: model.layers["3"]})
    with pytest.raises(ValueError, match="non-empty contiguous"):
        Stage({})


def test_stage_rejects_bad_range():
    with pytest.raises(ValueError, match="non-empty range"):
        build_stage(SPEC, CFG, range(4, 7), seed=SEED)
    with pytest.raises(ValueError, match="non-empty range"):
        build_stage(SPEC, CFG, range(2, 2), seed=SEED)


def test_build_layer_ignores_global_rng():
    torch.manual_seed(0)
    a = layer(CFG, 2).state_dict()
    torch.manual_seed(999)
    torch.rand(100)
    b = layer(CFG, 2).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_build_layer_leaves_global_rng_alone():
    torch.manual_seed(7)
    state = torch.get_rng_state()
    layer(CFG, 1)
    assert torch.equal(torch.get_rng_state(), state)


def test_seed_and_index_change_weights():
    w = layer(CFG, 1).attn.qkv.weight
    assert not torch.equal(w, layer(CFG, 2).attn.qkv.weight)
    assert not torch.equal(w, layer(CFG, 1, SEED + 1).attn.qkv.weight)


def test_gpt2_init():
    cfg = GPT2Config(n_layers=8, d_model=128, n_heads=4, seq_len=16)
    block = layer(cfg, 1)
    resid_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
    assert block.attn.qkv.weight.std().item() == pytest.approx(cfg.init_std, rel=0.05)
    assert block.mlp.proj.weight.std().item() == pytest.approx(resid_std, rel=0.05)
    assert block.attn.proj.weight.std().item() == pytest.approx(resid_std, rel=0.05)
    assert torch.all(block.attn.qkv.bias == 0)
    assert torch.all(block.ln1.weight == 1) and torch.all(block.ln1.bias == 0)


def test_causal():
    model = build_model(SPEC, CFG, seed=SEED)
    x = tokens(batch=2)
    base = model(x)
    for t in (0, 5, CFG.seq_len - 2):
        changed = x.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 1) % CFG.vocab_size
        out = model(changed)
        assert torch.equal(out[:, : t + 1], base[:, : t + 1])
        assert not torch.equal(out[:, t + 1], base[:, t + 1])


def test_float64_and_deterministic():
    model = build_model(SPEC, CFG, seed=SEED, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    x = tokens()
    logits = model(x)
    assert logits.dtype == torch.float64
    assert torch.equal(logits, model(x))
    loss = loss_fn(logits, tokens(seed=1))
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss_fn(model(x), tokens(seed=1)).backward()
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters(), strict=True))


def test_float64_starts_from_float32_weights():
    m64 = build_model(SPEC, CFG, seed=SEED, dtype=torch.float64)
    m32 = build_model(SPEC, CFG, seed=SEED)
    for p64, p32 in zip(m64.parameters(), m32.parameters(), strict=True):
        assert torch.equal(p64, p32.double())
    x = tokens()
    assert torch.allclose(m64(x).float(), m32(x), atol=1e-5)


def test_fresh_loss_near_uniform():
    logits = build_model(SPEC, CFG, seed=SEED)(tokens())
    loss = loss_fn(logits, tokens(seed=1))
    assert loss.dim() == 0
    assert abs(loss.item() - math.log(CFG.vocab_size)) < 0.1
    assert SPEC.loss is loss_fn


def test_sequence_too_long():
    t = CFG.seq_len + 1
    with pytest.raises(ValueError, match=f"sequence of length {t} is longer than {CFG.seq_len}"):
        build_model(SPEC, CFG, seed=SEED)(tokens(t=t))


def closed_form_params(cfg):
    """The old hand-written parameter count of each layer (the embedding has seq_len rows)."""
    d, v, t = cfg.d_model, cfg.vocab_size, cfg.seq_len
    hidden = cfg.mlp_ratio * d
    embed = (v + t) * d
    # ln1 + qkv + proj + ln2 + fc + proj, weights and biases
    block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * hidden + hidden)
    block += hidden * d + d
    head = 2 * d + d * v
    return [float(embed)] + [float(block)] * cfg.n_layers + [float(head)]


@pytest.mark.parametrize("mlp_ratio", [4, 2])
@pytest.mark.parametrize("tie", [True, False])
def test_param_costs_match_numel_and_closed_form(mlp_ratio, tie):
    cfg = GPT2Config(
        n_layers=3, d_model=24, n_heads=3, seq_len=10, vocab_size=50, mlp_ratio=mlp_ratio,
        tie_embeddings=tie,
    )  # fmt: skip
    costs = layer_costs(SPEC, cfg, "params")
    assert costs == layer_costs(SPEC, cfg)  # params is the default kind
    assert costs == closed_form_params(cfg)
    model = build_model(SPEC, cfg)
    assert len(costs) == cfg.num_layers
    layers = [model.layers[str(i)] for i in range(cfg.num_layers)]
    assert costs == [sum(p.numel() for p in m.parameters()) for m in layers]
    # The head's matmul costs the same whether or not its matrix is tied to the embedding.
    every = model.named_parameters(remove_duplicate=False)
    assert sum(costs) == sum(p.numel() for _, p in every)


def test_param_costs_count_the_longer_position_table():
    cfg = GPT2Config(n_layers=1, d_model=8, n_heads=2, seq_len=10, vocab_size=50,
                     max_positions=40)  # fmt: skip
    assert layer_costs(SPEC, cfg, "params")[0] == (50 + 40) * 8


def test_flop_costs():
    cfg = GPT2Config(n_layers=2, d_model=64, n_heads=4, seq_len=32, vocab_size=100)
    d = cfg.d_model
    assert layer_costs(SPEC, cfg, "flops") == [
        d,
        24 * d * d + 4 * cfg.seq_len * d,
        24 * d * d + 4 * cfg.seq_len * d,
        2 * d * cfg.vocab_size,
    ]


def test_unknown_cost_kind():
    with pytest.raises(ValueError, match="unknown cost kind 'memory' .*use one of params, flops"):
        layer_costs(SPEC, CFG, "memory")


def test_build_layer_index_out_of_range():
    with pytest.raises(ValueError, match="out of range"):
        layer(CFG, CFG.num_layers)
    with pytest.raises(ValueError, match="out of range"):
        layer(CFG, -1)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(d_model=30, n_heads=4), "model.d_model=30 is not divisible by model.n_heads=4"),
        (dict(n_layers=0), "model.n_layers must be a positive integer"),
        (dict(n_layers=True), "model.n_layers must be a positive integer"),
        (dict(n_heads=-2), "model.n_heads must be a positive integer"),
        (dict(seq_len=0), "model.seq_len"),
        (dict(vocab_size=0), "model.vocab_size"),
        (dict(mlp_ratio=0), "model.mlp_ratio"),
        (dict(d_model=32.0), "model.d_model must be a positive integer"),
        (dict(init_std=0.0), "model.init_std must be > 0"),
        (dict(init_std=float("nan")), "model.init_std must be a finite number"),
        (dict(activation="relu"), "model.activation='relu' is not one of gelu, gelu_tanh"),
        (dict(max_positions=7), "model.max_positions=7 is below model.seq_len=8"),
    ],
)
def test_config_errors(kwargs, match):
    base = dict(n_layers=2, d_model=32, n_heads=4, seq_len=8)
    with pytest.raises(ValueError, match=match):
        GPT2Config(**{**base, **kwargs})


def test_tied_embeddings_share_or_start_equal():
    model = build_model(SPEC, CFG, seed=SEED)
    last = str(CFG.num_layers - 1)
    assert model.layers[last].lm_head.weight is model.layers["0"].tok.weight
    head_alone = build_stage(SPEC, CFG, range(CFG.num_layers - 1, CFG.num_layers), seed=SEED)
    (weight,) = [p for n, p in head_alone.named_parameters() if n.endswith("lm_head.weight")]
    assert torch.equal(weight, model.layers["0"].tok.weight)
    assert SPEC.tie_groups(CFG) == {
        "embedding": ("layers.0.tok.weight", f"layers.{last}.lm_head.weight")
    }
    untied_cfg = dataclasses.replace(CFG, tie_embeddings=False)
    untied = build_model(SPEC, untied_cfg, seed=SEED)
    assert untied.layers[last].lm_head.weight is not untied.layers["0"].tok.weight
    assert SPEC.tie_groups(untied_cfg) == {}


# ---------------------------------------------------------------- activation


def gelu_exact(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


@pytest.mark.parametrize(
    "activation,approximate,formula",
    [("gelu", "none", gelu_exact), ("gelu_tanh", "tanh", gelu_tanh)],
)
def test_activation(activation, approximate, formula):
    cfg = dataclasses.replace(CFG, activation=activation)
    block = layer(cfg, 1, dtype=torch.float64)
    assert isinstance(block.mlp.act, nn.GELU) and block.mlp.act.approximate == approximate
    x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    torch.testing.assert_close(block.mlp.act(x), formula(x), rtol=1e-14, atol=1e-15)
    # the MLP applies it between its two projections
    h = torch.randn(
        2, 3, cfg.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    expected = block.mlp.proj(formula(block.mlp.fc(h)))
    torch.testing.assert_close(block.mlp(h), expected, rtol=1e-12, atol=1e-14)


def test_default_activation_is_exact_gelu_and_tanh_differs():
    assert CFG.activation == "gelu"
    x = torch.linspace(-3, 3, 101, dtype=torch.float64)
    # the two forms are close but not equal, so the switch is observable
    assert 1e-5 < (gelu_exact(x) - gelu_tanh(x)).abs().max() < 1e-2
    exact = build_model(SPEC, CFG, seed=SEED, dtype=torch.float64)
    approx = build_model(SPEC, dataclasses.replace(CFG, activation="gelu_tanh"), seed=SEED,
                         dtype=torch.float64)  # fmt: skip
    for (n1, p1), (n2, p2) in zip(exact.named_parameters(), approx.named_parameters(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)  # same weights: only the activation differs
    x = tokens()
    assert not torch.equal(exact(x), approx(x))
    torch.testing.assert_close(exact(x), approx(x), rtol=0, atol=1e-3)


# ---------------------------------------------------------------- position table


def test_max_positions_longer_than_seq_len():
    cfg = dataclasses.replace(CFG, max_positions=2 * CFG.seq_len)
    assert CFG.positions == CFG.seq_len and cfg.positions == 2 * CFG.seq_len
    embed = layer(cfg, 0)
    assert embed.pos.weight.shape == (2 * CFG.seq_len, CFG.d_model)
    assert layer(CFG, 0).pos.weight.shape == (CFG.seq_len, CFG.d_model)
    model = build_model(SPEC, cfg, seed=SEED)
    assert model(tokens()).shape == (3, CFG.seq_len, CFG.vocab_size)
    # windows up to max_positions fit the table; longer ones are refused
    assert embed(tokens(t=2 * CFG.seq_len)).shape == (3, 2 * CFG.seq_len, CFG.d_model)
    with pytest.raises(ValueError, match=f"longer than {2 * CFG.seq_len}"):
        embed(tokens(t=2 * CFG.seq_len + 1))
    # boundary shapes follow the training window, not the table
    assert SPEC.boundary_shape(cfg, 3) == (3, CFG.seq_len, CFG.d_model)


def test_max_positions_equal_to_seq_len_is_the_default_table():
    cfg = dataclasses.replace(CFG, max_positions=CFG.seq_len)
    a, b = build_model(SPEC, cfg, seed=SEED), build_model(SPEC, CFG, seed=SEED)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_max_positions_shorter_than_seq_len_is_an_error():
    with pytest.raises(ValueError, match="model.max_positions=8 is below model.seq_len=16"):
        dataclasses.replace(CFG, max_positions=CFG.seq_len // 2)
