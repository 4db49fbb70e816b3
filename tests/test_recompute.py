"""Selective activation recomputation (schedule.recompute = "selective"), serial, float64.

The attention core of each family runs under a non-reentrant checkpoint: same loss, same
gradients, and exactly the saved bytes the formula in hpcpipe/models/api.py predicts.
"""

import json
from contextlib import nullcontext

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from hpcpipe.config import (
    RECOMPUTE_MODES,
    ConfigError,
    ScheduleSection,
    build_config,
    load_config,
    recompute_mode,
    to_dict,
)
from hpcpipe.models import get_spec
from hpcpipe.models.api import (
    attention_core,
    build_layer,
    build_model,
    build_stage,
    enable_selective_recompute,
    layer_costs,
    supports_selective_recompute,
)
from hpcpipe.models.gpt2 import GPT2Config
from hpcpipe.models.llama import LlamaConfig
from hpcpipe.pipeline.partition import partition_layers
from hpcpipe.pipeline.runtime import ActionError, PipelineRuntime
from hpcpipe.pipeline.schedule import build_schedule
from hpcpipe.pipeline.zero_bubble import WeightGradStore, enable_split_backward

torch.set_num_threads(1)

SEED = 5
BATCH = 2
TINY = {
    "gpt2": GPT2Config(n_layers=2, d_model=16, n_heads=2, seq_len=8),
    # grouped-query attention: the key/value expansion is part of the core
    "llama": LlamaConfig(
        n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, ffn_hidden=48, seq_len=12
    ),
}
KERNELS = {"flash": None, "math": SDPBackend.MATH}  # the CPU default, and the math fallback


def kernel(name: str):
    return sdpa_kernel(KERNELS[name]) if KERNELS[name] else nullcontext()


def tokens(config, batch=BATCH, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, config.seq_len + 1), generator=gen)


def loss_and_grads(arch: str, selective: bool, kernel_name: str = "flash"):
    spec, config = get_spec(arch), TINY[arch]
    model = build_model(spec, config, SEED, torch.float64)
    assert enable_selective_recompute(model, selective) == config.n_layers  # one per block
    batch = tokens(config)
    with kernel(kernel_name):  # the forward only: backward recomputes under the same kernel
        loss = spec.loss(model(batch[:, :-1]), batch[:, 1:])
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


# --- (1) same loss, same gradients ---------------------------------------------------------


@pytest.mark.parametrize("kernel_name", KERNELS)
@pytest.mark.parametrize("arch", TINY)
def test_selective_recompute_changes_no_number(arch, kernel_name):
    loss, grads = loss_and_grads(arch, False, kernel_name)
    again, regrads = loss_and_grads(arch, True, kernel_name)
    assert torch.equal(again, loss)
    assert grads.keys() == regrads.keys()
    for name, grad in grads.items():
        assert torch.equal(regrads[name], grad), name  # bit for bit: a deterministic rerun


def test_off_by_default_and_plain_without_grad():
    config = TINY["gpt2"]
    model = build_model(get_spec("gpt2"), config, SEED, torch.float64)
    attentions = [m for m in model.modules() if hasattr(m, "selective_recompute")]
    assert len(attentions) == config.n_layers and not any(m.selective_recompute for m in attentions)
    enable_selective_recompute(model)
    calls = []

    def core(x):
        calls.append(torch.is_grad_enabled())
        return x.sin()  # saves x: backward needs the recomputation

    x = torch.ones(3, requires_grad=True)
    with torch.no_grad():  # e.g. full recomputation's first forward: nothing to checkpoint
        attention_core(attentions[0], core, x)
    attention_core(attentions[0], core, x).sum().backward()
    assert calls == [False, True, True]  # the checkpointed call ran again in backward
    assert enable_selective_recompute(model, False) == config.n_layers
    assert not any(m.selective_recompute for m in attentions)


def test_a_module_must_declare_the_flag():
    with pytest.raises(TypeError, match="does not declare `selective_recompute = False`"):
        attention_core(torch.nn.Identity(), lambda x: x, torch.ones(1))


# --- (2) what it saves: exactly the formula of hpcpipe/models/api.py -------------------------


def core_bytes_dropped(kernel_name, b, s, h, h_kv, d, dtype) -> int:
    """Bytes per layer that selective recomputation stops saving (torch 2.13, CPU)."""
    e = torch.empty((), dtype=dtype).element_size()
    a = 8 if dtype == torch.float64 else 4  # the kernels' accumulator
    if kernel_name == "flash":  # logsumexp, plus the expanded keys and values of GQA
        return b * h * s * a + 2 * b * (h - h_kv) * s * d * e
    # math: softmax, scaled q and k, contiguous v (upcast), less the core's inputs
    return b * h * s * s * a + 3 * b * h * s * d * a - b * (h + 2 * h_kv) * s * d * e


def saved_bytes(layer, x, kernel_name) -> int:
    """Bytes of the distinct storages autograd saves in one forward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with kernel(kernel_name), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    out.sum().backward()  # and backward works (recomputing under the forward's kernel)
    return sum(storages.values())


def block_saved_bytes(arch, config, batch, dtype, kernel_name) -> tuple[int, int]:
    """(without, with) selective recomputation, for one transformer block."""
    layer = build_layer(get_spec(arch), config, 1, SEED, dtype)
    x = torch.randn(batch, config.seq_len, config.d_model, dtype=dtype, requires_grad=True)
    plain = saved_bytes(layer, x, kernel_name)
    assert enable_selective_recompute(layer) == 1
    return plain, saved_bytes(layer, x, kernel_name)


def heads(config) -> tuple[int, int, int]:
    return config.n_heads, getattr(config, "kv_heads", config.n_heads), config.head_dim


@pytest.mark.parametrize("kernel_name", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("arch", TINY)
def test_saved_bytes_drop_exactly_the_attention_core(arch, dtype, kernel_name):
    config = TINY[arch]
    plain, selective = block_saved_bytes(arch, config, BATCH, dtype, kernel_name)
    h, h_kv, d = heads(config)
    dropped = core_bytes_dropped(kernel_name, BATCH, config.seq_len, h, h_kv, d, dtype)
    assert dropped > 0
    assert selective == plain - dropped


def test_saved_bytes_of_a_multi_head_llama():
    """Without GQA Llama drops only the logsumexp, as GPT-2 does."""
    config = LlamaConfig(n_layers=2, d_model=16, n_heads=2, ffn_hidden=24, seq_len=8)
    plain, selective = block_saved_bytes("llama", config, BATCH, torch.float64, "flash")
    assert plain - selective == BATCH * 2 * 8 * 8


# --- (3) the config ------------------------------------------------------------------------

SPELLINGS = {
    "full": [True, 1, "true", "TRUE", "1", "yes", "on", "On", "full", "Full", " full "],
    "false": [False, 0, "false", "False", "0", "no", "off", "none", "None"],
    "selective": ["selective", "Selective", "SELECTIVE"],
}


@pytest.mark.parametrize(
    "value, mode", [(v, mode) for mode, vs in SPELLINGS.items() for v in vs], ids=repr
)
def test_every_spelling_normalises(value, mode):
    assert recompute_mode(value) == mode
    assert build_config({"schedule": {"recompute": value}}).schedule.recompute == mode
    assert ScheduleSection(recompute=value).recompute == mode


@pytest.mark.parametrize(
    "text, mode",
    [("selective", "selective"), ("full", "full"), ("true", "full"), ("false", "false")],
)
def test_command_line_and_toml(tmp_path, text, mode):
    assert load_config(None, {"schedule.recompute": text}).schedule.recompute == mode
    path = tmp_path / "run.toml"
    value = text if text in ("true", "false") else f'"{text}"'
    path.write_text(f"[schedule]\nrecompute = {value}\n")
    assert load_config(path).schedule.recompute == mode


def test_default_is_false_and_modes_are_three():
    assert build_config({}).schedule.recompute == "false"
    assert RECOMPUTE_MODES == ("false", "full", "selective")


@pytest.mark.parametrize("value", ["partial", "", "fulll", 2, -1, 1.5, [True], None])
def test_a_bad_value_names_the_key_the_value_and_the_modes(value):
    with pytest.raises(ConfigError) as info:
        build_config({"schedule": {"recompute": value}})
    message = str(info.value)
    assert message.startswith(f"schedule.recompute = {value!r} is not a recompute mode")
    for mode in ("false", '"full"', "true", '"selective"'):
        assert mode in message


def test_command_line_bad_value():
    with pytest.raises(ConfigError, match="schedule.recompute = 'sometimes' is not a recompute"):
        load_config(None, {"schedule.recompute": "sometimes"})


@pytest.mark.parametrize("mode", RECOMPUTE_MODES)
def test_manifest_round_trip(mode):
    config = build_config({"schedule": {"recompute": mode}})
    stored = json.loads(json.dumps(to_dict(config)))  # as a checkpoint manifest holds it
    assert stored["schedule"]["recompute"] == mode
    assert build_config(stored) == config


def test_old_manifests_with_booleans_still_load():
    stored = to_dict(build_config({}))
    stored["schedule"]["recompute"] = True
    assert build_config(stored).schedule.recompute == "full"


def test_a_family_without_a_core_is_refused_for_selective():
    arch = "examples.own_model:spec"
    assert not supports_selective_recompute(get_spec(arch), get_spec(arch).config_class())
    with pytest.raises(ConfigError) as info:
        build_config({"model": {"arch": arch}, "schedule": {"recompute": "selective"}})
    message = str(info.value)
    assert f"model.arch={arch!r}" in message and "schedule.recompute=full" in message
    full = build_config({"model": {"arch": arch}, "schedule": {"recompute": "full"}})
    assert full.schedule.recompute == "full"
    for builtin in ("gpt2", "llama"):
        assert supports_selective_recompute(get_spec(builtin), TINY[builtin])
        config = build_config({"model": {"arch": builtin}, "schedule": {"recompute": "selective"}})
        assert config.schedule.recompute == "selective"


# --- (4) the runtime -----------------------------------------------------------------------


def local_runtime(arch, mode, V=2, M=3, schedule="gpipe"):
    """V chunks on one rank (K = 1, p2p=None), selective recomputation switched on as asked."""
    spec, config = get_spec(arch), TINY[arch]
    partition = partition_layers(layer_costs(spec, config), V)
    stages = {
        s: build_stage(spec, config, partition.layers(s), SEED, torch.float64) for s in range(V)
    }
    if mode == "selective":
        assert (
            sum(enable_selective_recompute(stage) for stage in stages.values()) == config.n_layers
        )
    store = WeightGradStore() if schedule == "zb-h1" else None
    if store is not None:
        for stage in stages.values():
            enable_split_backward(stage, store)
    return PipelineRuntime(
        stages=stages,
        actions=build_schedule(schedule, 1, M, V)[0],
        num_stages=V,
        pp_size=1,
        p2p=None,
        activation_shape=spec.boundary_shape(config, BATCH),
        dtype=torch.float64,
        device=torch.device("cpu"),
        loss_fn=spec.loss,
        recompute=mode,
        weight_store=store,
    )


def runtime_grads(arch, mode, schedule="gpipe", V=2):
    M = 3
    runtime = local_runtime(arch, mode, V, M, schedule)
    batches = [tokens(TINY[arch], seed=m) for m in range(M)]
    result = runtime.step([(t[:, :-1], t[:, 1:]) for t in batches])
    grads = {
        n: p.grad.clone()
        for stage in runtime.stages.values()
        for n, p in stage.named_parameters(remove_duplicate=False)
    }
    return result, grads


@pytest.mark.parametrize(
    "schedule, V", [("gpipe", 2), ("zb-h1", 1)], ids=["gpipe-V2", "zb-h1-split-backward"]
)
@pytest.mark.parametrize("arch", TINY)
def test_runtime_selective_equals_no_recompute(arch, schedule, V):
    plain, grads = runtime_grads(arch, "false", schedule, V)
    for mode in ("selective", "full", True):  # True: the legacy boolean, meaning full
        result, regrads = runtime_grads(arch, mode, schedule, V)
        assert result.loss == plain.loss
        assert result.peak_activations == plain.peak_activations
        for name, grad in grads.items():
            torch.testing.assert_close(regrads[name], grad, rtol=1e-12, atol=0)


def test_runtime_selective_keeps_activations_but_not_the_cores():
    """Only "full" makes the runtime drop activations; "selective" drops the cores' share."""

    def forward_saved(mode):
        runtime = local_runtime("gpt2", mode, V=1, M=1)
        runtime._micro = [(t[:, :-1], t[:, 1:]) for t in [tokens(TINY["gpt2"])]]
        runtime._state, runtime._m, runtime._held, runtime._peak = {}, 1, 0, 0
        runtime._busy, runtime._loss = 0.0, torch.zeros((), dtype=torch.float64)
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            runtime._run(runtime.actions[0])  # 0F0
        return sum(seen.values())

    plain, selective, full = (forward_saved(mode) for mode in ("false", "selective", "full"))
    config = TINY["gpt2"]
    h, h_kv, d = heads(config)
    dropped = core_bytes_dropped("flash", BATCH, config.seq_len, h, h_kv, d, torch.float64)
    assert selective == plain - config.n_layers * dropped
    assert full == 0


def test_runtime_refuses_an_unknown_mode():
    runtime = local_runtime("gpt2", "sometimes", V=1, M=1)
    batch = tokens(TINY["gpt2"])
    with pytest.raises(ActionError, match="recompute='sometimes' is not one of"):
        runtime.step([(batch[:, :-1], batch[:, 1:])])
