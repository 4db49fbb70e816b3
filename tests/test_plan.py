"""The planner's time model and search, on machines whose numbers the tests choose."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
import torch

from hpcpipe import config as cfg
from hpcpipe.cli.main import main
from hpcpipe.models import get_spec
from hpcpipe.plan import roofline
from hpcpipe.plan.machines import LayerTimes, ring_allreduce
from hpcpipe.plan.presets import PRESETS, preset_overrides
from hpcpipe.plan.search import search
from hpcpipe.plan.timemodel import Layout, PlanModel, predict

SMALL = {"model.n_layers": 8, "model.d_model": 64, "model.n_heads": 4, "model.seq_len": 32,
         "model.vocab_size": 256, "train.global_batch": 16}  # fmt: skip


def plan_for(overrides=SMALL, dtype="float32") -> PlanModel:
    config = cfg.build_config({}, dict(overrides))
    spec = get_spec(config.model.arch)
    return PlanModel(spec, config.model, dtype, config.train.global_batch)


@dataclass
class UnitMachine:
    """Every layer takes f, b, w per sequence of the micro-batch; links cost `hop` per message
    and `reduce` per all-reduce; the optimizer costs `opt` per parameter."""

    f: float = 1.0
    b: float = 1.0
    w: float = 1.0
    hop: float = 0.0
    reduce: float = 0.0
    opt: float = 0.0
    gpus_per_node: int = 8
    memory_bytes: float = 1e15
    speed: list | None = None
    step_overhead: float = 0.0
    name: str = "unit"

    def peak_tflops(self, dtype):
        return None

    def layer_times(self, spec, model, index, tp, batch, dtype, recompute, tp_comm, procs=1):
        f, b, w = self.f * batch / tp, self.b * batch / tp, self.w * batch / tp
        return LayerTimes(f, b, w, b + w)

    def p2p(self, nbytes, intra):
        return self.hop

    def allreduce(self, n, nbytes, intra):
        return self.reduce if n > 1 else 0.0

    def reduce_scatter(self, n, nbytes, intra):
        return self.allreduce(n, nbytes, intra) / 2

    allgather = reduce_scatter

    def optimizer(self, numel, half):
        return self.opt * numel


def test_presets_build_the_published_shapes():
    counts = {}
    for name in PRESETS:
        config = cfg.build_config({}, preset_overrides(name))
        from hpcpipe.plan.flops import param_count

        counts[name] = param_count(get_spec(config.model.arch), config.model)
    assert 174e9 < counts["gpt3-175b"] < 176e9
    assert 7.9e9 < counts["llama3-8b"] < 8.1e9
    assert 70.0e9 < counts["llama3-70b"] < 71.0e9
    assert 405e9 < counts["llama3-405b"] < 406e9
    with pytest.raises(ValueError, match="valid presets"):
        preset_overrides("gpt5")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_roofline_counts_every_gemm_of_the_family(arch):
    config = cfg.build_config({}, {**SMALL, "model.arch": arch})
    spec = get_spec(arch)
    per_token = spec.layer_flops(config.model)
    # layer 0 has no GEMM (GPT-2's layer_flops counts its position add, d_model per token)
    for index in range(1, spec.num_layers(config.model)):
        ops = roofline.layer_ops(spec, config.model, index, 3, torch.float32)
        assert ops.flops == pytest.approx(per_token[index] * 3 * config.model.seq_len, rel=1e-12)


def test_roofline_small_gemms_hit_the_memory_roof():
    roof = roofline.Roof(flops_per_s=1e12, attention_flops_per_s=1e12, bytes_per_s=1e9)
    big = roof.gemm(2 * 4096**3, 3 * 4096 * 4096 * 2)  # intensity ~1365 FLOP/B: compute-bound
    skinny = roof.gemm(2 * 1 * 4096 * 4096, (4096 + 4096 * 4096 + 4096) * 2)  # ~1 FLOP/B
    assert big == pytest.approx(2 * 4096**3 / 1e12)
    assert skinny == pytest.approx((4096 + 4096 * 4096 + 4096) * 2 / 1e9)


def test_ring_allreduce_is_bandwidth_plus_latency_terms():
    assert ring_allreduce(1, 1e9, 1e9, 1e-6) == 0
    assert ring_allreduce(4, 1e9, 1e9, 1e-6) == pytest.approx(1.5 + 6e-6)


def test_one_rank_step_is_all_its_work_plus_the_optimizer():
    plan = plan_for()
    machine = UnitMachine(opt=1e-6, step_overhead=0.5)
    M, mbs = 4, 4
    got = predict(plan, machine, Layout(1, 1, 1, 1, M, "1f1b", "false", 0))
    layers = plan.num_layers
    work = M * layers * mbs * (1 + 1 + 1)
    params = sum(plan.layer_params)
    assert got.step_s == pytest.approx(work + 1e-6 * params + 0.5)
    assert got.bubble == pytest.approx(0)


def test_full_recompute_adds_one_forward_per_backward():
    plan = plan_for()
    machine = UnitMachine()
    plain = predict(plan, machine, Layout(1, 1, 1, 1, 4, "1f1b", "false", 0)).step_s
    full = predict(plan, machine, Layout(1, 1, 1, 1, 4, "1f1b", "full", 0)).step_s
    assert full == pytest.approx(plain * 4 / 3)


def test_pipeline_step_is_the_busiest_rank_plus_fill_and_drain():
    plan = plan_for()
    machine = UnitMachine(w=0.0)
    lay = Layout(1, 2, 1, 1, 4, "1f1b", "false", 0)
    got = predict(plan, machine, lay)
    mbs = lay.microbatch_size(plan.global_batch)
    per_mb = [2 * len(s) * mbs for s in plan.partition(2)]  # F + B per micro-batch
    busiest = 4 * max(per_mb)
    # the other rank's first F and last B cannot overlap the busiest rank's work
    assert busiest < got.pipeline_s <= busiest + min(per_mb) + 1e-9
    assert got.bubble > 0


def test_one_bucket_is_reduced_after_the_last_backward(monkeypatch):
    plan = plan_for()  # far below GradReducer's 25 MiB: one bucket, final at the very end
    lay = Layout(2, 1, 1, 1, 2, "1f1b", "false", 0)
    base = predict(plan, UnitMachine(), lay)
    slow = predict(plan, UnitMachine(reduce=100.0), lay)
    assert slow.step_s == pytest.approx(base.step_s + 100.0)


def test_small_buckets_hide_behind_the_rest_of_the_backward(monkeypatch):
    from hpcpipe.plan import timemodel

    plan = plan_for()
    largest = max(plan.layer_params) * 4  # float32 gradient bytes
    monkeypatch.setattr(timemodel, "BUCKET_BYTES", largest)  # about a layer per bucket
    lay = Layout(2, 1, 1, 1, 2, "1f1b", "false", 0)
    base = predict(plan, UnitMachine(), lay)
    quick = predict(plan, UnitMachine(reduce=0.01), lay)
    # each bucket reduces while the layers before it run their backward; only the last
    # bucket (holding layer 0) is left after the backward
    assert quick.dp_exposed_s == pytest.approx(0.01)
    assert quick.step_s == pytest.approx(base.step_s + 0.01)


def test_zero_shards_the_optimizer_and_adds_the_gather():
    plan = plan_for()
    machine = UnitMachine(opt=1e-3, reduce=0.0)
    z0 = predict(plan, machine, Layout(2, 1, 1, 1, 2, "1f1b", "false", 0))
    z1 = predict(plan, machine, Layout(2, 1, 1, 1, 2, "1f1b", "false", 1))
    assert z1.optimizer_s == pytest.approx(z0.optimizer_s / 2)


def test_shared_cores_slow_concurrent_ranks():
    plan = plan_for()
    lay = Layout(4, 1, 1, 1, 1, "1f1b", "false", 0)
    alone = predict(plan, UnitMachine(), lay).step_s
    shared = predict(plan, UnitMachine(speed=[1.0, 1.0, 0.66, 0.5]), lay).step_s
    assert shared == pytest.approx(alone / 0.5)


def test_search_rejects_what_cannot_run_and_says_why():
    plan = plan_for()
    result = search(plan, UnitMachine(), gpus=8, gpus_per_node=4, top=3)
    reasons = {r.category: r.reason for r in result.rejected}
    assert "tensor parallelism stays inside a node" in reasons["tp"]
    assert "cannot fill" in reasons["layers"]  # 10 layers, pp x V up to 8 x 4
    assert len(result.ranked) == 3
    steps = [r.step_s for r in result.ranked]
    assert steps == sorted(steps)


def test_branch_and_bound_finds_the_exhaustive_best():
    plan = plan_for()
    machine = UnitMachine(hop=0.3, reduce=2.0, opt=1e-5)
    pruned = search(plan, machine, gpus=4, top=3)
    exhaustive = search(plan, machine, gpus=4, top=100000)
    assert [r.layout for r in pruned.ranked] == [r.layout for r in exhaustive.ranked[:3]]
    assert pruned.simulated < exhaustive.simulated


def test_memory_limit_rejects_and_reports_the_fastest_unfit():
    plan = plan_for()
    result = search(plan, UnitMachine(memory_bytes=1e3), gpus=2, top=2)
    assert not result.ranked
    assert any(r.category == "memory" for r in result.rejected)


def test_cli_json_has_the_contract_keys(capsys, tmp_path):
    png = tmp_path / "chosen.png"
    code = main(["plan", "--preset", "llama3-8b", "--gpus", "64", "--gpus-per-node", "8",
                 "--device", "h100-80g", "--top", "3", "--format", "json",
                 "--explain", str(png)])  # fmt: skip
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert png.stat().st_size > 1000  # the chosen layout's simulated timeline
    ranks = out["layouts"][0]["pp"]
    assert captured.err.count(" GiB ") >= ranks  # memory per pipeline rank
    assert code == 0
    assert {"params", "model_flops_per_step", "layouts"} <= set(out)
    keys = {
        "dp",
        "pp",
        "tp",
        "virtual",
        "microbatches",
        "schedule",
        "recompute",
        "zero",
        "predicted_step_s",
        "tflops_per_gpu",
        "mfu",
        "memory_bytes_per_gpu",
        "fits",
    }
    assert out["layouts"] and all(keys <= set(lay) for lay in out["layouts"])
    best = out["layouts"][0]
    assert best["fits"] and best["dp"] * best["pp"] * best["tp"] == 64
    assert 0 < best["mfu"] < 1
    assert best["tflops_per_gpu"] == pytest.approx(
        out["model_flops_per_step"] / best["predicted_step_s"] / 64 / 1e12
    )
    assert math.isclose(out["params"], 8.03e9, rel_tol=0.01)


def test_cli_refuses_a_missing_device_file(capsys):
    code = main(["plan", "--gpus", "4", "--device", "nowhere.json"])
    assert code == 2
    assert "neither a known device" in capsys.readouterr().err


@pytest.mark.parametrize("machine", [UnitMachine(hop=0.3, reduce=2.0, opt=1e-5),
                                     UnitMachine(w=0.5, speed=[1.0, 0.9, 0.6, 0.5])])  # fmt: skip
def test_lower_bound_never_exceeds_the_prediction(machine):
    from hpcpipe.plan.search import enumerate_layouts
    from hpcpipe.plan.timemodel import lower_bound

    plan = plan_for()
    for layout in enumerate_layouts(plan, 4, 8, {}, []):
        bound, step = lower_bound(plan, machine, layout), predict(plan, machine, layout).step_s
        assert bound <= step * (1 + 1e-12), layout
