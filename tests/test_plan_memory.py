"""The planner's memory model: per-layer traces, the symbolic schedule walk, whole layouts.

Its reference is the trainer's own start-up prediction (train.memory.predict_rank: whole stages
traced, the built schedule walked), which tests/test_memory.py shows equals the measurement.
"""

import random
import resource
import time

import pytest
import torch

from hpcpipe.config import build_config
from hpcpipe.models.api import build_stage
from hpcpipe.models.gpt2 import SPEC as GPT2
from hpcpipe.models.gpt2 import GPT2Config
from hpcpipe.models.llama import SPEC as LLAMA
from hpcpipe.models.llama.model import LlamaConfig
from hpcpipe.pipeline.schedule import (
    SPLIT_BACKWARD,
    ScheduleError,
    build_schedule,
    named_placement,
    peak_microbatches,
    stages_of,
)
from hpcpipe.plan import memory as plan
from hpcpipe.train import memory
from hpcpipe.train.memory import StageBytes, activation_bytes_per_microbatch

torch.set_num_threads(1)

BENCHMARK = {"arch": "gpt2", "n_layers": 8, "d_model": 256, "n_heads": 4, "seq_len": 128,
             "vocab_size": 256}  # fmt: skip
SMALL_LLAMA = {"arch": "llama", "n_layers": 4, "d_model": 128, "n_heads": 4, "n_kv_heads": 2,
               "seq_len": 64, "vocab_size": 256}  # fmt: skip
GLOBAL_BATCH = 32

TINY_GPT = GPT2Config(n_layers=4, d_model=64, n_heads=4, seq_len=16, vocab_size=250)
TINY_LLAMA = LlamaConfig(
    n_layers=4, d_model=64, n_heads=8, n_kv_heads=4, seq_len=16, ffn_hidden=96, vocab_size=250
)
TINY = [(GPT2, TINY_GPT), (LLAMA, TINY_LLAMA)]


def traced_stage(spec, config, layers, b, dtype, mode, split, tp=1) -> StageBytes:
    """The trainer's way: the whole stage traced at once (on one tp rank's shards)."""
    traced_spec, options = plan.tp_trace_options(spec, config, tp)
    return activation_bytes_per_microbatch(
        traced_spec, config, layers, b, dtype, mode, split_backward=split, **options
    )


# ---------------------------------------------------------------- per-layer traces


@pytest.mark.parametrize(("spec", "config"), TINY, ids=["gpt2", "llama"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("split", [False, True])
def test_each_part_of_a_layer_is_a_line_in_the_microbatch_size(spec, config, dtype, split):
    # fitted at b = 1 and 2, exact at any b
    for index in (0, 1, spec.num_layers(config) - 1):
        line = plan.layer_bytes(spec, config, index, dtype=dtype, split_backward=split)
        for b in (3, 5):
            assert line.at(b) == traced_stage(spec, config, [index], b, dtype, "false", split)


@pytest.mark.parametrize(("spec", "config"), TINY, ids=["gpt2", "llama"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["false", "selective"])
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("tp", [1, 2])
def test_a_stage_is_its_layers_plus_the_junctions_between_them(
    spec, config, dtype, mode, split, tp
):
    n = spec.num_layers(config)
    for layers in (range(0, n), range(1, 4), range(0, 2), range(3, n), range(2, 3)):
        got = plan.stage_activation_bytes(
            spec, config, layers, 3, dtype=dtype, recompute=mode, split_backward=split, tp=tp
        )
        assert got == traced_stage(spec, config, layers, 3, dtype, mode, split, tp), layers


def test_a_junction_is_the_boundary_when_the_next_layer_saves_it():
    b, bf16 = 2, torch.bfloat16
    boundary = 2 * b * TINY_GPT.seq_len * TINY_GPT.d_model  # bytes in bfloat16
    # GPT-2's LayerNorm saves its input: the stage keeps the boundary as well as the runtime
    gpt = plan.junction_bytes(GPT2, TINY_GPT, 1, dtype=bf16, split_backward=True)
    assert gpt.body.at(b) == boundary
    # ... whose gradient both one-layer traces keep under a split backward, a stage once
    assert gpt.deferred.at(b) == -boundary
    # Llama's bfloat16 RMSNorm saves its float32 upcast, not the boundary itself
    llama = plan.junction_bytes(LLAMA, TINY_LLAMA, 1, dtype=bf16)
    assert llama.body.at(b) == 0 and llama.deferred is None


def test_alike_layers_share_one_signature():
    signatures = plan.layer_signatures(GPT2, TINY_GPT)
    assert len(signatures) == TINY_GPT.num_layers
    assert len(set(signatures)) == 3  # the embedding, every block, the head


# ---------------------------------------------------------------- the schedule, symbolically


def _microbatch_grid(name, K, V):
    """Short schedules, and long ones past the M at which schedule_peaks stops walking."""
    candidates = set(range(1, 2 * K + 2)) | {3 * K + 3, 4 * K + 1, 5 * K, 8 * K, 9 * K + 9}
    for M in sorted(candidates):
        try:
            yield M, build_schedule(name, K, M, V)
        except ScheduleError:  # an M the interleaved rounds cannot split
            continue


SCHEDULE_SHAPES = [
    (name, K, V)
    for name in ("gpipe", "1f1b", "zb-h1", "zb-h2", "interleaved", "interleaved-zb", "zb-v")
    for K in (1, 2, 3, 4)
    for V in ((1,) if name in ("1f1b", "zb-h1", "zb-h2") else (2,) if name == "zb-v" else (1, 2, 3))
]


def own_stages(name, K, V, rank):
    """The rank's stages in chunk order: round robin, or the V shape's r and 2K - 1 - r."""
    return stages_of(named_placement(name, K, V), rank)


@pytest.mark.parametrize(("name", "K", "V"), SCHEDULE_SHAPES)
def test_schedule_peaks_equal_the_walk_of_the_built_schedule(name, K, V):
    rng = random.Random(f"{name}{K}{V}")
    split = name in SPLIT_BACKWARD
    for M, schedule in _microbatch_grid(name, K, V):
        for mode in ("false", "full"):
            peaks = plan.schedule_peaks(name, K, M, V, mode == "full")
            for rank, actions in schedule.items():
                got = peaks[rank]
                assert got.comm_buffers == memory.predict_comm(actions, 1)
                assert got.peak_microbatches == peak_microbatches(actions)
                for _ in range(3):  # unequal chunks, every part its own size
                    chunks = [_random_stage_bytes(rng, split) for _ in range(V)]
                    by_stage = dict(zip(own_stages(name, K, V, rank), chunks, strict=True))
                    want = memory.peak_activation_bytes(actions, by_stage, split, mode)
                    assert got.activation_bytes(chunks) == want, (M, mode, rank)


def _random_stage_bytes(rng, split) -> StageBytes:
    deferred = rng.randint(0, 300) if split else None
    return StageBytes(rng.randint(0, 40), rng.randint(0, 40), rng.randint(0, 300), deferred)


def test_long_schedules_are_walked_shorter_with_the_same_peaks():
    assert plan._walked_microbatches("1f1b", 4, 1536, 1) == 14
    assert plan._walked_microbatches("interleaved", 4, 1536, 2) == 4 * 5
    assert plan._walked_microbatches("interleaved", 4, 10, 2) == 10  # R = 5: only 2 rounds
    assert plan._walked_microbatches("interleaved", 6, 35, 4) == 7 * 4  # R = 7 > K kept
    rng = random.Random(7)
    cases = [("zb-h1", 3, 120, 1), ("interleaved-zb", 3, 120, 2), ("interleaved", 6, 35, 4),
             ("interleaved-zb", 6, 35, 4)]  # fmt: skip
    for name, K, M, V in cases:
        split = name in SPLIT_BACKWARD
        schedule = build_schedule(name, K, M, V)
        for mode in ("false", "full"):
            peaks = plan.schedule_peaks(name, K, M, V, mode == "full")
            for rank, actions in schedule.items():
                chunks = [_random_stage_bytes(rng, split) for _ in range(V)]
                by_stage = {rank + c * K: sb for c, sb in enumerate(chunks)}
                want = memory.peak_activation_bytes(actions, by_stage, split, mode)
                assert peaks[rank].activation_bytes(chunks) == want, (name, mode, rank)
                assert peaks[rank].comm_buffers == memory.predict_comm(actions, 1)


def test_schedule_peaks_refuse_what_build_schedule_refuses():
    with pytest.raises(ScheduleError, match="M=8 or M=10"):
        plan.schedule_peaks("interleaved", 4, 9, 2)
    with pytest.raises(ScheduleError, match="V=1"):
        plan.schedule_peaks("1f1b", 4, 8, 2)
    with pytest.raises(ScheduleError, match="unknown"):
        plan.schedule_peaks("forward-only", 4, 8, 1)


def test_big_schedules_are_fast_once_walked():
    for name, V in (("1f1b", 1), ("zb-h1", 1), ("interleaved", 4)):
        start = time.perf_counter()
        first = plan.schedule_peaks(name, 64, 1536, V)
        walked = time.perf_counter()
        again = plan.schedule_peaks(name, 64, 1536, V)
        cached = time.perf_counter()
        print(f"{name} K=64 M=1536 V={V}: walk {walked - start:.3f} s, cached "
              f"{1e6 * (cached - walked):.1f} us")  # fmt: skip
        assert again is first
    # 1F1B: rank r holds K - r micro-batches
    assert [p.peak_microbatches for p in plan.schedule_peaks("1f1b", 64, 1536)] == [
        64 - r for r in range(64)
    ]


# ---------------------------------------------------------------- layouts vs predict_rank


def _config(model, pp, V, name, recompute, zero, dp, dtype, M=8):
    return build_config(
        {
            "model": model,
            "train": {"global_batch": GLOBAL_BATCH, "dtype": dtype},
            "parallel": {"pp": pp, "dp": dp, "zero": zero},
            "schedule": {"name": name, "microbatches": M, "recompute": recompute, "virtual": V},
        }
    )


LAYOUTS = [  # model, pp, V, schedule, recompute, zero, dp, dtype
    (BENCHMARK, 1, 1, "gpipe", "false", 0, 1, "float32"),
    (BENCHMARK, 2, 1, "1f1b", "false", 0, 1, "float32"),
    (BENCHMARK, 4, 1, "1f1b", "selective", 1, 2, "bfloat16"),
    (BENCHMARK, 4, 1, "gpipe", "full", 0, 1, "bfloat16"),
    (BENCHMARK, 2, 2, "interleaved", "false", 0, 1, "float32"),
    (BENCHMARK, 1, 2, "interleaved", "selective", 0, 1, "bfloat16"),  # stages share buffers
    (BENCHMARK, 2, 1, "zb-h1", "false", 1, 2, "bfloat16"),
    (BENCHMARK, 4, 1, "zb-h1", "full", 0, 1, "float32"),
    (BENCHMARK, 2, 2, "interleaved-zb", "selective", 1, 2, "float32"),
    (BENCHMARK, 4, 2, "interleaved-zb", "full", 0, 1, "bfloat16"),
    (SMALL_LLAMA, 2, 1, "1f1b", "selective", 0, 1, "bfloat16"),
    (SMALL_LLAMA, 2, 2, "interleaved-zb", "false", 1, 2, "float32"),
    (SMALL_LLAMA, 4, 1, "zb-h1", "full", 0, 1, "bfloat16"),
]


@pytest.mark.parametrize(
    ("model", "pp", "V", "name", "recompute", "zero", "dp", "dtype"),
    LAYOUTS,
    ids=[f"{m['arch']}-pp{pp}-V{V}-{n}-{r}-zero{z}-{d}" for m, pp, V, n, r, z, _, d in LAYOUTS],
)
def test_layout_memory_is_the_trainers_prediction(model, pp, V, name, recompute, zero, dp, dtype):
    from hpcpipe.train.trainer import make_blueprint

    config = _config(model, pp, V, name, recompute, zero, dp, dtype)
    blueprint = make_blueprint(config, dp * pp, data=False)
    s = config.schedule
    got = plan.layout_memory(
        blueprint.spec, blueprint.model, dtype=dtype, dp=dp, pp=pp, tp=1, virtual=V,
        microbatches=s.microbatches, microbatch_size=blueprint.microbatch_size,
        schedule_name=name, recompute=s.recompute, zero=zero,
        partition=blueprint.partition.counts,
    )  # fmt: skip
    for rank, mine in enumerate(got):
        want = memory.predict_rank(blueprint, config, rank)
        # exact, activations included: the per-layer lines and junctions add up to the stage
        # traces, and the symbolic walk is the schedule's walk
        for key in (*memory.PREDICTED_KEYS, "peak_microbatches"):
            assert mine[key] == want[key], (rank, key)
        assert mine["pp_rank"] == rank


# ---------------------------------------------------------------- tensor parallelism


def _trainer_numels(spec, config, partition, pp, tp) -> list[int]:
    """Parameters per pp rank on one tp rank, as the trainer builds and shards its stages."""
    from hpcpipe.parallel.tensor_parallel import TPContext, parallelize_stage

    numels = []
    for rank in range(pp):
        per_tp_rank = set()
        for tp_rank in range(tp):
            context = TPContext(comm=None, rank=tp_rank, size=tp)  # sharding sends nothing
            stages = [
                build_stage(spec, config, partition.layers(stage), seed=0)
                for stage in range(rank, len(partition.counts), pp)
            ]
            for stage in stages if tp > 1 else ():
                parallelize_stage(stage, spec, config, context)
            unique = {id(p): p for stage in stages for p in stage.parameters()}
            per_tp_rank.add(sum(p.numel() for p in unique.values()))
        assert len(per_tp_rank) == 1  # every tp rank holds as many (padded vocabulary rows too)
        numels.append(per_tp_rank.pop())
    return numels


@pytest.mark.parametrize(("spec", "config"), TINY, ids=["gpt2", "llama"])
@pytest.mark.parametrize(("pp", "V"), [(1, 1), (2, 1), (1, 2), (2, 2)])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_sharded_parameters_are_the_trainers(spec, config, pp, V, tp):
    from hpcpipe.pipeline.partition import partition_layers

    partition = partition_layers([1.0] * spec.num_layers(config), pp * V)
    got = plan.layout_memory(
        spec, config, dtype="float32", dp=1, pp=pp, tp=tp, virtual=V, microbatches=4,
        microbatch_size=1, schedule_name="gpipe" if V == 1 else "interleaved",
        recompute="false", zero=0, partition=partition.counts,
    )  # fmt: skip
    want = _trainer_numels(spec, config, partition, pp, tp)
    assert [r["params"] // 4 for r in got] == want


@pytest.mark.parametrize(("spec", "config"), TINY, ids=["gpt2", "llama"])
@pytest.mark.parametrize("name", ["1f1b", "zb-h1"])
def test_tp_shards_activations_but_not_all_of_them(spec, config, name):
    # attention and MLP insides shrink by tp; the residual stream and norms stay whole
    def activations(tp):
        layout = plan.layout_memory(
            spec, config, dtype="bfloat16", dp=1, pp=2, tp=tp, virtual=1, microbatches=4,
            microbatch_size=2, schedule_name=name, recompute="false", zero=0, partition=[3, 3],
        )  # fmt: skip
        return [r["activations"] for r in layout]

    whole, halves = activations(1), activations(2)
    for one, two in zip(whole, halves, strict=True):
        assert one / 2 < two < one


def test_tp_the_model_cannot_split_is_refused():
    from hpcpipe.parallel.tensor_parallel import TensorParallelError

    with pytest.raises(TensorParallelError, match="n_heads"):
        plan.layout_memory(
            GPT2, TINY_GPT, dtype="float32", dp=1, pp=1, tp=3, virtual=1, microbatches=1,
            microbatch_size=1, schedule_name="gpipe", recompute="false", zero=0, partition=[6],
        )  # fmt: skip


def test_a_partition_must_cover_the_stages():
    with pytest.raises(ValueError, match="pp x virtual"):
        plan.layout_memory(
            GPT2, TINY_GPT, dtype="float32", dp=1, pp=2, tp=1, virtual=1, microbatches=2,
            microbatch_size=1, schedule_name="1f1b", recompute="false", zero=0, partition=[6],
        )  # fmt: skip


# ---------------------------------------------------------------- at scale


GPT3 = GPT2Config(n_layers=96, d_model=12288, n_heads=96, seq_len=2048, vocab_size=50257)


def test_a_175b_layout_is_fast_after_its_first_trace_and_allocates_nothing():
    dp, pp, tp = 8, 16, 8
    counts = [7] + [6] * (pp - 2) + [7]  # 96 blocks, the embedding first, the head last
    layout = {
        "dtype": "bfloat16", "dp": dp, "pp": pp, "tp": tp, "virtual": 1, "microbatches": 64,
        "microbatch_size": 1, "schedule_name": "1f1b", "recompute": "false", "zero": 1,
        "partition": counts,
    }  # fmt: skip
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    ranks = plan.layout_memory(GPT2, GPT3, **layout)
    traced = time.perf_counter()
    plan.layout_memory(GPT2, GPT3, **layout)
    cached = time.perf_counter()
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_rss
    print(f"175B: first call {traced - start:.2f} s, then {1e3 * (cached - traced):.1f} ms; "
          f"peak RSS grew {grown / 1024:.0f} MiB")  # fmt: skip
    # real tensors would hold a sharded block's weights (0.45 GB) and its activations at b = 2
    assert grown < 512 * 1024
    per_gpu = 175e9 / (pp * tp) * 2  # bf16 parameters, evenly spread
    assert all(abs(r["params"] / per_gpu - 1) < 0.1 for r in ranks)
    assert ranks[0]["peak_microbatches"] == pp and ranks[-1]["peak_microbatches"] == 1
    assert all(r["total"] == sum(r[k] for k in memory.PREDICTED_KEYS[:-1]) for r in ranks)
