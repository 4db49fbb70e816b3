"""The model API (hpcpipe/models/api.py) and the model.arch registry, serially.

Uses the example family outside the package (examples/own_model, selected as
"examples.own_model:spec") and a deliberately broken one defined here (BROKEN).
"""

import dataclasses
import math
import sys
import uuid
from pathlib import Path

import pytest
import torch
from torch import nn

from hpcpipe.config import ConfigError, all_keys, build_config
from hpcpipe.models import UnknownModelError, get_spec
from hpcpipe.models.api import (
    Stage,
    build_layer,
    build_model,
    build_stage,
    check_boundaries,
    config_keys,
    layer_costs,
    param_costs,
    split_name,
    tie_within,
)
from hpcpipe.train.trainer import make_blueprint

ROOT = Path(__file__).resolve().parent.parent
ARCH = "examples.own_model:spec"
KEYS = "arch, d_model, init_std, mlp_ratio, n_heads, n_layers, seq_len, tie_embeddings, vocab_size"


@pytest.fixture(autouse=True)
def in_repository_root(monkeypatch):
    """`examples` is found from the working directory, as when hpcpipe runs from the root."""
    monkeypatch.chdir(ROOT)


def own(**kwargs):
    """(spec, config) of the example family, small."""
    spec = get_spec(ARCH)
    return spec, spec.config_class(**{"n_layers": 2, "d_model": 16, "seq_len": 8, **kwargs})


def config_for(arch=ARCH, model=None, **sections):
    tables = {"model": {"arch": arch, "seq_len": 8, **(model or {})},
              "train": {"global_batch": 4}, "schedule": {"microbatches": 2}}  # fmt: skip
    for name, table in sections.items():
        tables.setdefault(name, {}).update(table)
    return build_config(tables)


def _broken_layer(config, index):
    """Layer 1 widens the hidden state: a stage boundary after it would not match."""
    layer = get_spec(ARCH).build_layer(config, index)
    if index != 1:
        return layer
    return nn.Sequential(layer, nn.Linear(config.d_model, 2 * config.d_model))


def __getattr__(name):
    """BROKEN: the example family with _broken_layer (made on first use: the registry finds
    examples/ from the working directory, which the autouse fixture sets)."""
    if name == "BROKEN":
        return dataclasses.replace(get_spec(ARCH), name="broken", build_layer=_broken_layer)
    raise AttributeError(name)


BROKEN_ARCH = f"{__name__}:BROKEN"


# --- the API -------------------------------------------------------------------------------


def test_build_layer_depends_only_on_seed_and_index():
    spec, config = own()
    rng = torch.get_rng_state()
    a, again = (build_layer(spec, config, 1, seed=5).state_dict() for _ in range(2))
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is neither used nor moved
    assert a.keys() == again.keys() and all(torch.equal(a[k], again[k]) for k in a)
    torch.manual_seed(99)  # nor read
    assert torch.equal(build_layer(spec, config, 1, seed=5).qkv.weight, a["qkv.weight"])
    assert not torch.equal(build_layer(spec, config, 1, seed=6).qkv.weight, a["qkv.weight"])
    assert not torch.equal(build_layer(spec, config, 2, seed=5).qkv.weight, a["qkv.weight"])
    wide = build_layer(spec, config, 1, seed=5, dtype=torch.float64)
    assert wide.qkv.weight.dtype == torch.float64
    assert torch.equal(wide.qkv.weight, a["qkv.weight"].double())  # drawn in float32, then cast
    with pytest.raises(ValueError, match="layer index 4 out of range 0..3"):
        build_layer(spec, config, 4, seed=5)


def test_tie_within_shares_and_a_lone_copy_starts_equal():
    spec, config = own()
    model = build_model(spec, config, seed=3)
    head, embed = model.layers["3"], model.layers["0"]
    assert head.lm_head.weight is embed.tok.weight
    alone = build_stage(spec, config, range(3, 4), seed=3).layers["3"]
    assert alone.lm_head.weight is not embed.tok.weight
    assert torch.equal(alone.lm_head.weight, embed.tok.weight)  # copied from the group's source
    layers = {i: build_layer(spec, config, i, seed=3) for i in (0, 3)}
    tie_within(spec, config, {3: layers[3]})  # one member: nothing to share
    assert layers[3].lm_head.weight is not layers[0].tok.weight
    tie_within(spec, config, layers)
    assert layers[3].lm_head.weight is layers[0].tok.weight
    spec, untied = own(tie_embeddings=False)
    model = build_model(spec, untied, seed=3)
    assert not torch.equal(model.layers["3"].lm_head.weight, model.layers["0"].tok.weight)


def test_stage_and_model_names_are_global():
    spec, config = own()
    local = {
        i: [n for n, _ in build_layer(spec, config, i, 0).named_parameters()] for i in range(4)
    }
    expected = {f"layers.{i}.{n}" for i, names in local.items() for n in names}
    model = build_model(spec, config)
    assert {n for n, _ in model.named_parameters(remove_duplicate=False)} == expected
    stage = build_stage(spec, config, range(1, 3))
    names = {n for n, _ in stage.named_parameters()}
    assert names == {n for n in expected if split_name(n)[0] in (1, 2)}
    assert list(stage.layer_indices) == [1, 2]
    x = torch.randint(0, 256, (2, 8))
    chained = build_stage(spec, config, range(2, 4))(build_stage(spec, config, range(0, 2))(x))
    assert torch.equal(chained, model(x))  # stages chain to the whole model, bit for bit


def test_stage_ranges_are_checked():
    spec, config = own()
    layers = {i: build_layer(spec, config, i, 0) for i in (0, 2)}
    with pytest.raises(ValueError, match="contiguous set of layers, got \\[0, 2\\]"):
        Stage(layers)
    with pytest.raises(ValueError, match="non-empty range within 0..3"):
        build_stage(spec, config, range(2, 5))
    with pytest.raises(ValueError, match="non-empty range"):
        build_stage(spec, config, range(0))


def test_param_costs_counted_on_meta():
    spec, config = own()
    devices = []

    def recording(config, index):
        devices.append(torch.empty(0).device.type)
        return spec.build_layer(config, index)

    def no_init(*args):
        raise AssertionError("param_costs must not initialise layers")

    probe = dataclasses.replace(spec, build_layer=recording, init_layer=no_init)
    costs = param_costs(probe, config)
    assert devices == ["meta"] * 4
    real = [build_layer(spec, config, i, 0) for i in range(4)]
    assert costs == [float(sum(p.numel() for p in layer.parameters())) for layer in real]
    assert costs[0] == 256 * 16 + 8 * 16  # token and position tables
    assert costs[3] == 16 * 256 + 2 * 16  # the head counts its (tied) projection too


def test_layer_costs_kinds_and_errors():
    spec, config = own()
    assert layer_costs(spec, config) == layer_costs(spec, config, "params")
    assert layer_costs(spec, config, "params") == param_costs(spec, config)
    msg = "unknown cost kind 'flops' for model.arch='examples.own_model:spec'; use one of params$"
    with pytest.raises(ValueError, match=msg):
        layer_costs(spec, config, "flops")  # the family gives no layer_flops
    gpt2 = get_spec("gpt2")
    g = gpt2.config_class(n_layers=2, d_model=16, n_heads=2, seq_len=8)
    assert layer_costs(gpt2, g, "flops") == gpt2.layer_flops(g)
    with pytest.raises(ValueError, match="use one of params, flops"):
        layer_costs(gpt2, g, "memory")
    with pytest.raises(ConfigError, match="unknown cost kind 'flops'"):
        make_blueprint(config_for(parallel={"pp": 2, "balance": "flops"}), 2)


def test_split_name():
    assert split_name("layers.7.attn.qkv.weight") == (7, "attn.qkv.weight")
    assert split_name("layers.0.tok.weight") == (0, "tok.weight")
    with pytest.raises(ValueError, match="start with 'layers.<index>.', got 'blocks.1.w'"):
        split_name("blocks.1.w")


def test_boundaries_and_keys_of_the_example():
    spec, config = own()
    check_boundaries(spec, config, batch=2)
    check_boundaries(get_spec("gpt2"), get_spec("gpt2").config_class(seq_len=8), batch=2)
    assert ", ".join(sorted(config_keys(spec))) == KEYS
    assert {f"model.{k}" for k in config_keys(spec)} <= set(all_keys(ARCH))


def test_example_is_a_causal_parallel_block_model():
    spec, config = own()
    block = build_layer(spec, config, 1, 0)
    assert sum(isinstance(m, nn.LayerNorm) for m in block.modules()) == 1  # one, shared
    model = build_model(spec, config)
    x = torch.randint(0, 256, (2, 8))
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % 256
    assert torch.equal(model(x)[:, :-1], model(y)[:, :-1])  # no token sees a later one
    targets = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss = float(spec.loss(model(x), targets))
    assert abs(loss - math.log(256)) < 0.1  # fresh: near uniform


# --- the registry and configuration errors --------------------------------------------------


def test_registry_names_what_it_returns():
    assert get_spec("gpt2") is get_spec("") is get_spec("gpt2")  # the default family
    assert get_spec(ARCH).name == ARCH  # messages quote the model.arch the user wrote
    assert config_for().model.arch == ARCH
    assert type(config_for().model).__module__ == "examples.own_model.model"


def test_unknown_arch_names_the_valid_ones():
    with pytest.raises(ConfigError) as info:
        config_for("gpt3")
    assert str(info.value) == (
        "unknown model.arch='gpt3'; valid: gpt2, llama, or 'package.module:spec' naming your "
        "own ModelSpec"
    )
    with pytest.raises(ConfigError) as info:
        config_for("examples.own_model")  # a module without its attribute
    assert str(info.value).endswith("; a module needs its attribute too, e.g. '" + ARCH + "'")


@pytest.mark.parametrize(
    "arch, message",
    [
        ("examples.no_such:spec", "no module 'examples.no_such' on sys.path or in the working"),
        ("no_such_pkg_q.mod:spec", "no module 'no_such_pkg_q' on sys.path or in the working"),
        ("examples.own_model:nope", "module examples.own_model has no attribute 'nope'; its "
                                    "ModelSpecs: spec"),
        ("json:dumps", "model.arch='json:dumps' names a function, not a ModelSpec"),
        ("examples.own_model:", "is not 'package.module:attribute'"),
        (":spec", "is not 'package.module:attribute'"),
    ],
)  # fmt: skip
def test_arch_that_does_not_import(arch, message):
    with pytest.raises(ConfigError, match="^model.arch=") as info:
        config_for(arch)
    assert message in str(info.value)


def _package(tmp_path, body: str) -> str:
    name = f"fam_{uuid.uuid4().hex[:8]}"
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text(body)
    return name


def test_working_directory_is_searched_only_for_the_target(tmp_path, monkeypatch):
    broken = _package(tmp_path, "import not_installed_dep_q\n")
    good = _package(tmp_path, "from hpcpipe.models.gpt2 import SPEC as spec\n")
    monkeypatch.chdir(tmp_path)
    # as under the console script: neither '' nor the directory itself on sys.path
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    before = list(sys.path)
    try:
        with pytest.raises(UnknownModelError) as info:
            get_spec(f"{broken}:spec")  # the target is found, one of its imports is not
        assert f"importing {broken} failed: ModuleNotFoundError: No module named " in str(
            info.value
        )
        assert sys.path == before + [str(tmp_path)]  # looked for here, found here, kept
        assert get_spec(f"{good}:spec").name == f"{good}:spec"
        assert sys.path == before + [str(tmp_path)]  # not added twice
    finally:
        for name in (broken, good):
            sys.modules.pop(name, None)


def test_unknown_model_key_lists_the_family_keys():
    with pytest.raises(ConfigError) as info:
        config_for(model={"n_kv_heads": 2})
    assert str(info.value) == (
        f"unknown key model.n_kv_heads; [model] of model.arch='{ARCH}' accepts: {KEYS}"
    )
    with pytest.raises(ConfigError, match="unknown key model.activation"):
        config_for(model={"activation": "gelu"})  # a GPT-2 key, not this family's
    with pytest.raises(ConfigError, match="model.d_model=16 must divide by n_heads=3"):
        config_for(model={"d_model": 16, "n_heads": 3})  # the family's own validation


def test_boundary_shape_mismatch_names_the_layer_and_both_shapes():
    config = config_for(BROKEN_ARCH, {"d_model": 32}, parallel={"pp": 2})
    with pytest.raises(ConfigError) as info:
        make_blueprint(config, 2)
    message = str(info.value)
    assert message.startswith(f"model.arch='{BROKEN_ARCH}': layer 1 outputs shape (2, 8, 64)")
    assert "the family's boundary_shape is (2, 8, 32)" in message


def test_tensor_parallel_without_a_plan():
    config = config_for(parallel={"tp": 2})
    with pytest.raises(ConfigError) as info:
        make_blueprint(config, 2)
    assert str(info.value) == f"model.arch='{ARCH}' has no tensor-parallel plan; use parallel.tp=1"


def test_engine_packages_import_no_model_family():
    """pipeline/, parallel/ and checkpoint/ see a family only through the ModelSpec API."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "hpcpipe"
    family = re.compile(r"^\s*(from|import)\s+(hpcpipe\.models\.(gpt2|llama)|examples)\b", re.M)
    offenders = [
        str(path.relative_to(root))
        for package in ("pipeline", "parallel", "checkpoint")
        for path in sorted((root / package).rglob("*.py"))
        if family.search(path.read_text())
    ]
    assert offenders == []
