"""The runtime on one process: local stage hand-off, recomputation, failure reports."""

from types import SimpleNamespace

import pytest
import torch

from hpcpipe import data
from hpcpipe.config import build_config
from hpcpipe.models.api import build_stage, enable_selective_recompute, layer_costs
from hpcpipe.models.gpt2 import SPEC, GPT2Config
from hpcpipe.models.gpt2.model import loss_fn
from hpcpipe.parallel import tied
from hpcpipe.parallel.grid import Topology
from hpcpipe.pipeline.partition import partition_layers
from hpcpipe.pipeline.runtime import ActionError, PipelineRuntime
from hpcpipe.pipeline.schedule import build_schedule
from hpcpipe.train.serial import SerialTrainer

TINY = GPT2Config(n_layers=2, d_model=16, n_heads=2, seq_len=8)
SEED = 3


def microbatches(M: int):
    tokens = data.load_tokens(None, max_bytes=16 * 1024)
    sampler = data.Sampler(len(tokens), TINY.seq_len, 2 * M, SEED)
    inputs, targets = data.make_batch(tokens, sampler.next_starts(), TINY.seq_len)
    return tokens, data.split_microbatches(inputs, targets, M)


def local_runtime(V: int, M: int, recompute=False, fail_at=None) -> PipelineRuntime:
    """V chunks of the model on one rank (K = 1): stages hand tensors over without MPI."""
    partition = partition_layers(layer_costs(SPEC, TINY), V)
    stages = {
        s: build_stage(SPEC, TINY, partition.layers(s), SEED).to(torch.float64) for s in range(V)
    }
    if recompute == "selective":  # the attention cores: the model's part, the trainer's call
        for stage in stages.values():
            enable_selective_recompute(stage)
    return PipelineRuntime(
        stages=stages,
        actions=build_schedule("gpipe", 1, M, V)[0],
        num_stages=V,
        pp_size=1,
        p2p=None,
        activation_shape=(2, TINY.seq_len, TINY.d_model),
        dtype=torch.float64,
        device=torch.device("cpu"),
        loss_fn=loss_fn,
        recompute=recompute,
        fail_at=fail_at,
    )


def serial_grads(tokens, M: int) -> tuple[float, dict]:
    config = build_config(
        {
            "model": {"n_layers": 2, "d_model": 16, "n_heads": 2, "seq_len": 8},
            "train": {"global_batch": 2 * M, "dtype": "float64", "seed": SEED},
            "schedule": {"microbatches": M},
            "data": {"val_fraction": 0},  # microbatches() samples every window
        }
    )
    oracle = SerialTrainer(config, tokens=tokens)
    return oracle.forward_backward(), oracle.grads()


@pytest.mark.parametrize("V", [1, 2, 4])
@pytest.mark.parametrize("recompute", ["false", "full", "selective", True])  # True: legacy full
def test_local_chunks_equal_serial(V, recompute):
    M = 3
    tokens, mbs = microbatches(M)
    runtime = local_runtime(V, M, recompute)
    result = runtime.step(mbs)
    # Separate local copies of the tied embedding (V > 1): their gradients are summed.
    partition = partition_layers(layer_costs(SPEC, TINY), V)
    one_rank = SimpleNamespace(topology=Topology.parse(dp=1, pp=1, tp=1))  # split_pp unused
    (group,) = tied.build_groups(
        SPEC.tie_groups(TINY), runtime.stages, partition.stage_of_layer, one_rank
    )
    assert group.comm is None  # one rank holds every copy: summed locally
    assert len(group.copies) == (1 if V == 1 else 2)  # one shared Parameter, or two copies
    grads = [p.grad for p in group.copies]
    assert tied.sum_tied_grads(group, grads) == 0.0  # no waiting without a communicator
    ref_loss, ref_grads = serial_grads(tokens, M)
    assert result.loss == pytest.approx(ref_loss, rel=1e-12)
    for stage in runtime.stages.values():
        for name, p in stage.named_parameters(remove_duplicate=False):
            torch.testing.assert_close(p.grad, ref_grads[name], rtol=1e-10, atol=0)


def saved_bytes_during_forward(runtime, mbs) -> int:
    """Bytes autograd saves for backward while the forwards run."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for action in runtime.actions:
            if action.kind.value == "F":
                runtime._run(action)
    return sum(saved)


def test_recompute_keeps_no_activations_between_forward_and_backward():
    M = 2
    _, mbs = microbatches(M)
    plain, again = local_runtime(1, M), local_runtime(1, M, recompute="full")
    for r in (plain, again):
        r._micro, r._state, r._m = mbs, {}, M
        r._held = r._peak = 0
        r._busy, r._loss = 0.0, torch.zeros((), dtype=torch.float64)
    assert saved_bytes_during_forward(plain, mbs) > 0
    assert saved_bytes_during_forward(again, mbs) == 0


def test_failure_names_step_action_and_program():
    _, mbs = microbatches(2)
    runtime = local_runtime(2, 2, fail_at="0:1F1")
    with pytest.raises(ActionError) as info:
        runtime.step(mbs)
    message = str(info.value)
    assert "step 0, action 1F1" in message
    assert "[1F1]" in message and "injected failure" in message
