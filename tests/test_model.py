"""Serial tests for the layer-wise GPT."""

import math

import pytest
import torch

from hpcpipe.models.gpt2.model import (
    GPT,
    Block,
    Embedding,
    GPTConfig,
    Head,
    Stage,
    build_layer,
    layer_costs,
    loss_fn,
)

CFG = GPTConfig(n_layers=4, d_model=32, n_heads=4, seq_len=16)
SEED = 1234


def tokens(batch=3, t=CFG.seq_len, seed=0):
    """Random token ids from a local generator."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, CFG.vocab_size, (batch, t), generator=gen)


def test_layer_kinds():
    kinds = [type(build_layer(CFG, i, SEED)) for i in range(CFG.num_layers)]
    assert CFG.num_layers == CFG.n_layers + 2
    assert kinds == [Embedding] + [Block] * CFG.n_layers + [Head]


def test_gpt_equals_layers_one_by_one():
    model = GPT(CFG, seed=SEED)
    x = tokens()
    out = x
    for i in range(CFG.num_layers):
        out = build_layer(CFG, i, SEED)(out)
    logits = model(x)
    assert logits.shape == (3, CFG.seq_len, CFG.vocab_size)
    assert torch.equal(logits, out)


@pytest.mark.parametrize("start,stop", [(0, 1), (0, 3), (2, 5), (1, 6), (5, 6), (0, 6)])
def test_stage_matches_gpt_bit_for_bit(start, stop):
    full = dict(GPT(CFG, seed=SEED).named_parameters(remove_duplicate=False))
    stage = dict(Stage(CFG, range(start, stop), seed=SEED).named_parameters(remove_duplicate=False))
    expected = {k for k in full if start <= int(k.split(".")[1]) < stop}
    assert set(stage) == expected
    for name, p in stage.items():
        assert torch.equal(p, full[name]), name


def test_stages_chain_to_gpt_output():
    x = tokens()
    stages = [Stage(CFG, r, seed=SEED) for r in (range(0, 2), range(2, 3), range(3, 6))]
    assert stages[0].is_first and not stages[0].is_last
    assert stages[-1].is_last and not stages[1].is_first
    out = x
    for stage in stages:
        out = stage(out)
    assert torch.equal(out, GPT(CFG, seed=SEED)(x))


def test_stage_from_layers():
    model = GPT(CFG, seed=SEED)
    stage = Stage.from_layers({i: model.layers[i] for i in (3, 2, 4)})
    assert stage.layer_indices == range(2, 5)
    assert [n.split(".")[1] for n, _ in stage.named_parameters()][0] == "2"
    with pytest.raises(ValueError, match="contiguous"):
        Stage.from_layers({1: model.layers[1], 3: model.layers[3]})


def test_stage_rejects_bad_range():
    with pytest.raises(ValueError, match="non-empty range"):
        Stage(CFG, range(4, 7), seed=SEED)
    with pytest.raises(ValueError, match="non-empty range"):
        Stage(CFG, range(2, 2), seed=SEED)


def test_build_layer_ignores_global_rng():
    torch.manual_seed(0)
    a = build_layer(CFG, 2, SEED).state_dict()
    torch.manual_seed(999)
    torch.rand(100)
    b = build_layer(CFG, 2, SEED).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_build_layer_leaves_global_rng_alone():
    torch.manual_seed(7)
    state = torch.get_rng_state()
    build_layer(CFG, 1, SEED)
    assert torch.equal(torch.get_rng_state(), state)


def test_seed_and_index_change_weights():
    w = build_layer(CFG, 1, SEED).attn.qkv.weight
    assert not torch.equal(w, build_layer(CFG, 2, SEED).attn.qkv.weight)
    assert not torch.equal(w, build_layer(CFG, 1, SEED + 1).attn.qkv.weight)


def test_gpt2_init():
    cfg = GPTConfig(n_layers=8, d_model=128, n_heads=4, seq_len=16)
    block = build_layer(cfg, 1, SEED)
    resid_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
    assert block.attn.qkv.weight.std().item() == pytest.approx(cfg.init_std, rel=0.05)
    assert block.mlp.proj.weight.std().item() == pytest.approx(resid_std, rel=0.05)
    assert block.attn.proj.weight.std().item() == pytest.approx(resid_std, rel=0.05)
    assert torch.all(block.attn.qkv.bias == 0)
    assert torch.all(block.ln1.weight == 1) and torch.all(block.ln1.bias == 0)


def test_causal():
    model = GPT(CFG, seed=SEED)
    x = tokens(batch=2)
    base = model(x)
    for t in (0, 5, CFG.seq_len - 2):
        changed = x.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 1) % CFG.vocab_size
        out = model(changed)
        assert torch.equal(out[:, : t + 1], base[:, : t + 1])
        assert not torch.equal(out[:, t + 1], base[:, t + 1])


def test_float64_and_deterministic():
    model = GPT(CFG, seed=SEED, dtype=torch.float64)
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
    m64, m32 = GPT(CFG, seed=SEED, dtype=torch.float64), GPT(CFG, seed=SEED)
    for p64, p32 in zip(m64.parameters(), m32.parameters(), strict=True):
        assert torch.equal(p64, p32.double())
    x = tokens()
    assert torch.allclose(m64(x).float(), m32(x), atol=1e-5)


def test_fresh_loss_near_uniform():
    logits = GPT(CFG, seed=SEED)(tokens())
    loss = loss_fn(logits, tokens(seed=1))
    assert loss.dim() == 0
    assert abs(loss.item() - math.log(CFG.vocab_size)) < 0.1


def test_sequence_too_long():
    with pytest.raises(ValueError, match="seq_len"):
        GPT(CFG, seed=SEED)(tokens(t=CFG.seq_len + 1))


@pytest.mark.parametrize("mlp_ratio", [4, 2])
def test_param_costs_match_numel(mlp_ratio):
    cfg = GPTConfig(
        n_layers=3, d_model=24, n_heads=3, seq_len=10, vocab_size=50, mlp_ratio=mlp_ratio
    )
    costs = layer_costs(cfg, "params")
    model = GPT(cfg)
    assert len(costs) == cfg.num_layers
    assert costs == [sum(p.numel() for p in layer.parameters()) for layer in model.layers]
    # The head's matmul costs the same whether or not its matrix is tied to the embedding.
    every = model.named_parameters(remove_duplicate=False)
    assert sum(costs) == sum(p.numel() for _, p in every)


def test_flop_costs():
    cfg = GPTConfig(n_layers=2, d_model=64, n_heads=4, seq_len=32, vocab_size=100)
    d = cfg.d_model
    assert layer_costs(cfg, "flops") == [
        d,
        24 * d * d + 4 * cfg.seq_len * d,
        24 * d * d + 4 * cfg.seq_len * d,
        2 * d * cfg.vocab_size,
    ]


def test_unknown_cost_kind():
    with pytest.raises(ValueError, match="params, flops"):
        layer_costs(CFG, "memory")


def test_build_layer_index_out_of_range():
    with pytest.raises(ValueError, match="out of range"):
        build_layer(CFG, CFG.num_layers, SEED)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(d_model=30, n_heads=4), "d_model \\(30\\) must be divisible by n_heads \\(4\\)"),
        (dict(n_layers=0), "n_layers must be a positive integer"),
        (dict(n_heads=-2), "n_heads must be a positive integer"),
        (dict(seq_len=0), "seq_len"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(mlp_ratio=0), "mlp_ratio"),
        (dict(d_model=32.0), "d_model must be a positive integer"),
        (dict(init_std=0.0), "init_std must be > 0"),
        (dict(init_std=float("nan")), "init_std must be a finite number"),
    ],
)
def test_config_errors(kwargs, match):
    base = dict(n_layers=2, d_model=32, n_heads=4, seq_len=8)
    with pytest.raises(ValueError, match=match):
        GPTConfig(**{**base, **kwargs})


def test_tied_embeddings_share_or_start_equal():
    model = GPT(CFG, seed=SEED)
    assert model.layers[-1].lm_head.weight is model.layers[0].tok.weight
    head_alone = Stage(CFG, range(CFG.num_layers - 1, CFG.num_layers), seed=SEED)
    (weight,) = [p for n, p in head_alone.named_parameters() if n.endswith("lm_head.weight")]
    assert torch.equal(weight, model.layers[0].tok.weight)
    untied = GPT(GPTConfig(**{**CFG.__dict__, "tie_embeddings": False}), seed=SEED)
    assert untied.layers[-1].lm_head.weight is not untied.layers[0].tok.weight
