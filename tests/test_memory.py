"""Memory accounting: the saved-tensor meter, the traced prediction, the schedule walk."""

import threading
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from hpcpipe import data
from hpcpipe.config import build_config
from hpcpipe.models.api import build_stage, enable_selective_recompute, layer_costs
from hpcpipe.models.gpt2 import SPEC, GPT2Config
from hpcpipe.models.llama import SPEC as LLAMA
from hpcpipe.models.llama.model import LlamaConfig
from hpcpipe.parallel.p2p import BufferPool, Transfer
from hpcpipe.pipeline.partition import partition_layers
from hpcpipe.pipeline.runtime import PipelineRuntime
from hpcpipe.pipeline.schedule import SPLIT_BACKWARD, build_schedule, validate
from hpcpipe.pipeline.zero_bubble import WeightGradStore, enable_split_backward
from hpcpipe.train import memory
from hpcpipe.train.memory import SavedTensorMeter, StageBytes

torch.set_num_threads(1)

TINY = GPT2Config(n_layers=6, d_model=16, n_heads=2, seq_len=8)
TINY_LLAMA = LlamaConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, seq_len=8, ffn_hidden=48)
SEED = 3
BATCH = 2  # micro-batch size
DTYPES = [torch.float64, torch.float32]


def nbytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


# ---------------------------------------------------------------- the meter


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_counts_its_input_not_its_weight(dtype):
    weight = torch.nn.Parameter(torch.randn(5, 3, dtype=dtype))
    x = torch.randn(4, 3, dtype=dtype, requires_grad=True)
    meter = SavedTensorMeter()
    meter.ignore([weight])
    with meter:
        y = F.linear(x, weight)
    assert meter.current == meter.peak == x.nbytes  # the weight is saved too, but ignored
    y.sum().backward()
    assert meter.current == 0 and meter.peak == x.nbytes
    assert x.grad is not None and weight.grad is not None


@pytest.mark.parametrize("dtype", DTYPES)
def test_chain_counts_each_storage_once(dtype):
    x = torch.randn(6, dtype=dtype, requires_grad=True)
    meter = SavedTensorMeter()
    with meter:
        a = x.exp()  # saves its output a
        b = a.sin()  # saves a again: one storage
        c = b * x  # saves b and x
    assert meter.current == a.nbytes + b.nbytes + x.nbytes == 3 * 6 * x.element_size()
    c.sum().backward()
    assert meter.current == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_views_of_one_storage_count_it_whole_and_once(dtype):
    x = torch.randn(8, 4, dtype=dtype, requires_grad=True)
    meter = SavedTensorMeter()
    with meter:
        big = x * 2  # saves nothing (a Python scalar)
        top, bottom = big[:2], big[6:]  # two small views of one 8x4 storage
        out = top.sin().sum() + bottom.cos().sum() + big.t().tanh().sum()
    # sin and cos save their views, tanh its own output: big's storage once, tanh's result
    assert meter.current == nbytes(big) + big.nbytes
    out.backward()
    assert meter.current == 0


def test_graph_dropped_without_backward_is_released():
    x = torch.randn(100, requires_grad=True)
    meter = SavedTensorMeter()
    with meter:
        y = x.exp().sigmoid()  # both save their outputs: no reference cycle through the handle
    assert meter.current == 2 * x.nbytes
    del y
    assert meter.current == 0 and meter.peak == 2 * x.nbytes


def test_overlapping_microbatches():
    x = torch.randn(10, dtype=torch.float64, requires_grad=True)
    meter = SavedTensorMeter()
    with meter:
        first = (x.exp() * 3).sum()  # saves exp's output
    with meter:
        second = x.sin().sum()  # saves x
        third = x.cos().sum()  # saves x again: already counted
    assert meter.current == 2 * x.nbytes
    first.backward()
    assert meter.current == x.nbytes
    meter.reset()
    assert meter.peak == x.nbytes
    (second + third).backward()
    assert meter.current == 0 and meter.peak == x.nbytes


def test_nested_entry_and_hooks_only_inside():
    x = torch.randn(10, requires_grad=True)
    meter = SavedTensorMeter()
    with meter:
        with meter:
            a = x.exp()
        b = a.sin()  # still inside: counted (a is already)
    c = x.cos()  # outside: not counted
    assert meter.current == a.nbytes
    (b.sum() + c.sum()).backward()
    assert meter.current == 0


def test_hold_dedups_with_saved_and_releases():
    x = torch.randn(10, requires_grad=True)
    meter = SavedTensorMeter()
    with meter:
        y = x.exp()
    out = y * 2  # not saved by anyone
    held = meter.hold(y, out, None)
    assert meter.current == y.nbytes + out.nbytes  # y saved and held: once
    held.release()
    held.release()  # idempotent
    assert meter.current == y.nbytes
    again = meter.hold(out)
    del again  # dropping the Hold releases too
    assert meter.current == y.nbytes
    y.sum().backward()
    assert meter.current == 0


def test_hold_closures_counts_captured_tensors_but_parameters():
    weight = torch.nn.Parameter(torch.randn(3, 3))
    kept, other = torch.randn(5), torch.randn(7)

    def work():
        return kept.sum() + weight.sum()

    meter = SavedTensorMeter()
    meter.ignore([weight])
    held = meter.hold_closures([work], other)
    assert meter.current == kept.nbytes + other.nbytes
    del held
    assert meter.current == 0


def test_ignored_storage_is_forgotten_when_freed():
    meter = SavedTensorMeter()
    t = torch.randn(4)
    meter.ignore([t, t[1:]])
    assert len(meter._ignored) == 1
    del t
    assert len(meter._ignored) == 0


def test_meta_tensors_count_like_real_ones():
    def chain(device):
        x = torch.empty(6, 5, dtype=torch.float64, device=device, requires_grad=True)
        meter = SavedTensorMeter()
        with meter:
            a = x.exp()
            loss = (a[:2].sin().sum() + (a * x).sum()) * 2
        return meter.current, loss

    (real, _), (meta, _) = chain("cpu"), chain("meta")
    assert real == meta == 2 * 6 * 5 * 8


# ---------------------------------------------------------------- prediction = measurement


def measured_forward(spec, config, layers, dtype) -> int:
    """What the meter counts for one real micro-batch forward of a stage (as the runtime)."""
    stage = build_stage(spec, config, layers, SEED, dtype)
    meter = SavedTensorMeter()
    meter.ignore(stage.parameters())
    gen = torch.Generator().manual_seed(0)
    if layers[0] == 0:
        x = torch.randint(0, config.vocab_size, (BATCH, config.seq_len), generator=gen)
        meter.ignore([x])
    else:
        shape = spec.boundary_shape(config, BATCH)
        x = torch.randn(shape, dtype=dtype, generator=gen).requires_grad_()
    with meter:
        out = stage(x)
        if layers[-1] == spec.num_layers(config) - 1:
            target = torch.randint(0, config.vocab_size, (BATCH, config.seq_len), generator=gen)
            meter.ignore([target])
            out = spec.loss(out, target) / 1
    held = meter.hold(x, out)
    assert held.keys
    return meter.current


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("spec", "config", "layers"),
    [
        (SPEC, TINY, range(0, 2)),  # embedding + block
        (SPEC, TINY, range(1, 3)),  # two blocks
        (SPEC, TINY, range(6, 8)),  # block + head and loss
        (LLAMA, TINY_LLAMA, range(1, 3)),  # Llama blocks (GQA, rotary)
        (LLAMA, TINY_LLAMA, range(0, 4)),  # the whole Llama
    ],
)
def test_traced_prediction_equals_real_forward(spec, config, layers, dtype):
    predicted = memory.activation_bytes_per_microbatch(spec, config, layers, BATCH, dtype)
    assert predicted.forward == measured_forward(spec, config, layers, dtype)
    boundary = BATCH * config.seq_len * config.d_model * torch.empty((), dtype=dtype).itemsize
    assert predicted.input == (0 if layers[0] == 0 else boundary)


def test_meta_trace_is_close_but_uses_another_attention_kernel():
    fake = memory.activation_bytes_per_microbatch(SPEC, TINY, range(1, 3), BATCH, torch.float64)
    meta = memory.activation_bytes_per_microbatch(
        SPEC, TINY, range(1, 3), BATCH, torch.float64, device="meta"
    )
    assert meta.forward == pytest.approx(fake.forward, rel=0.10)


def test_selective_recompute_drops_attention_core_tensors():
    plain = memory.activation_bytes_per_microbatch(SPEC, TINY, range(1, 3), BATCH, torch.float32)
    selective = memory.activation_bytes_per_microbatch(
        SPEC, TINY, range(1, 3), BATCH, torch.float32, "selective"
    )
    # two blocks' logsumexp (b, h, s) in float32 (the CPU flash kernel; see models/api.py)
    assert plain.forward - selective.forward == 2 * BATCH * TINY.n_heads * TINY.seq_len * 4


# ---------------------------------------------------------------- the schedule walk


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "interleaved", "zb-h1", "interleaved-zb"])
@pytest.mark.parametrize("K", [2, 4])
@pytest.mark.parametrize("M", [4, 8])
def test_walk_equals_schedule_count_times_bytes(name, K, M):
    V = 2 if name.startswith("interleaved") else 1
    schedule = build_schedule(name, K, M, V)
    peaks = validate(schedule, K, M, V).peak_activations
    per_microbatch = 1000
    for rank, actions in schedule.items():
        stages = {a.stage: per_microbatch for a in actions}
        got = memory.peak_activation_bytes(actions, stages, name in SPLIT_BACKWARD)
        assert got == peaks[rank] * per_microbatch
        assert memory.peak_microbatches(actions) == peaks[rank]


def test_walk_with_unequal_chunks_and_full_recompute():
    actions = build_schedule("gpipe", 1, 2, 2)[0]  # 0F0 0F1 1F0 1F1 1B0 1B1 0B0 0B1
    stages = {0: StageBytes(input=0, output=10, body=100), 1: StageBytes(10, 1, 1000)}
    # everything held at the end of the forwards; stage 0's output is stage 1's input
    assert memory.peak_activation_bytes(actions, stages) == 2 * (100 + 10 + 1000 + 1)
    # full recompute: inputs only (stage 1's: 10 each), plus one recomputed stage 1 forward
    assert memory.peak_activation_bytes(actions, stages, recompute_mode="full") == 20 + 1001


# ---------------------------------------------------------------- the runtime, measured


def microbatches(M: int):
    tokens = data.load_tokens(None, max_bytes=16 * 1024)
    sampler = data.Sampler(len(tokens), TINY.seq_len, BATCH * M, SEED)
    inputs, targets = data.make_batch(tokens, sampler.next_starts(), TINY.seq_len)
    return data.split_microbatches(inputs, targets, M)


def make_runtime(name, K, V, M, rank, mode, meter, p2p=None):
    partition = partition_layers(layer_costs(SPEC, TINY), K * V)
    stages = {
        s: build_stage(SPEC, TINY, partition.layers(s), SEED).to(torch.float64)
        for s in range(rank, K * V, K)
    }
    store = None
    if name in SPLIT_BACKWARD:
        store = WeightGradStore()
        for stage in stages.values():
            enable_split_backward(stage, store)
    if mode == "selective":
        for stage in stages.values():
            enable_selective_recompute(stage)
    runtime = PipelineRuntime(
        stages=stages,
        actions=build_schedule(name, K, M, V)[rank],
        num_stages=K * V,
        pp_size=K,
        p2p=p2p,
        activation_shape=tuple(SPEC.boundary_shape(TINY, BATCH)),
        dtype=torch.float64,
        device=torch.device("cpu"),
        loss_fn=SPEC.loss,
        recompute=mode,
        weight_store=store,
        memory_meter=meter,
    )
    return runtime, partition


def predicted_peak(runtime, partition, name, mode) -> int:
    split = name in SPLIT_BACKWARD
    per_stage = {
        s: memory.activation_bytes_per_microbatch(
            SPEC, TINY, partition.layers(s), BATCH, torch.float64, mode, split_backward=split
        )
        for s in runtime.stages
    }
    return memory.peak_activation_bytes(runtime.actions, per_stage, split, mode)


@pytest.mark.parametrize("mode", ["false", "full", "selective"])
@pytest.mark.parametrize(
    ("name", "V", "M"),
    [("gpipe", 2, 3), ("interleaved", 2, 4), ("zb-h1", 1, 3), ("interleaved-zb", 2, 4)],
)
def test_one_rank_runtime_measures_the_prediction(name, V, M, mode):
    mbs = microbatches(M)
    meter = SavedTensorMeter()
    runtime, partition = make_runtime(name, 1, V, M, 0, mode, meter)
    result = runtime.step(mbs)
    predicted = predicted_peak(runtime, partition, name, mode)
    assert result.peak_activation_bytes == pytest.approx(predicted, rel=0.01)  # contract: 10 %
    assert meter.current == 0  # nothing held after the step
    # the meter changes no number: the same gradients as without it
    plain, _ = make_runtime(name, 1, V, M, 0, mode, None)
    assert plain.step(mbs).peak_activation_bytes == 0
    for s, stage in runtime.stages.items():
        for (key, p), q in zip(stage.named_parameters(), plain.stages[s].parameters(), strict=True):
            assert torch.equal(p.grad, q.grad), key


class _Hub:
    """In-process mailboxes: (source, dest, tag) -> tensor, for ranks run as threads."""

    def __init__(self):
        self.boxes: dict[tuple, torch.Tensor] = {}
        self.cond = threading.Condition()

    def put(self, key, tensor):
        with self.cond:
            self.boxes[key] = tensor
            self.cond.notify_all()

    def take(self, key):
        with self.cond:
            if not self.cond.wait_for(lambda: key in self.boxes, timeout=60):
                raise TimeoutError(f"nothing arrived for {key}")
            return self.boxes.pop(key)


class ThreadP2P:
    """The P2P surface the runtime uses, between threads; receives land in a BufferPool."""

    tag_ub = 2**30

    def __init__(self, rank: int, hub: _Hub):
        self.rank, self.hub, self.pool, self.wait_seconds = rank, hub, BufferPool(), 0.0

    def isend(self, tensor, peer, tag):
        self.hub.put((self.rank, peer, tag), tensor.detach().clone())

    def irecv(self, shape, dtype, device, peer, tag, what):
        buffer = self.pool.get(shape, dtype, device)
        return Transfer((peer, self.rank, tag), buffer, None, peer, tag, what, 0.0)

    def wait(self, transfer):
        if not transfer.received:
            transfer.buffer.copy_(self.hub.take(transfer.request))
            transfer.received = True
        return transfer.buffer

    def release(self, transfer):
        self.pool.put(transfer.buffer)

    def flush(self):
        pass


@pytest.mark.parametrize("mode", ["false", "full"])
@pytest.mark.parametrize("name", ["gpipe", "1f1b", "interleaved", "zb-h1"])
@pytest.mark.parametrize("K", [2, 4])
def test_ranks_measure_the_prediction(name, K, mode):
    """K ranks as threads (saved-tensor hooks are per thread): each rank's peak as predicted."""
    V, M = (2, 2 * K) if name == "interleaved" else (1, 2 * K)
    mbs = microbatches(M)
    hub = _Hub()
    runs = {}
    for rank in range(K):
        meter = SavedTensorMeter()
        p2p = ThreadP2P(rank, hub)
        runs[rank] = (*make_runtime(name, K, V, M, rank, mode, meter, p2p), meter, p2p)
    results, errors = {}, []

    def run(rank):
        try:
            results[rank] = runs[rank][0].step(mbs)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(K)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    boundary = BATCH * TINY.seq_len * TINY.d_model * 8
    for rank, (runtime, partition, meter, p2p) in runs.items():
        predicted = predicted_peak(runtime, partition, name, mode)
        measured = results[rank].peak_activation_bytes
        assert measured == pytest.approx(predicted, rel=0.10), rank
        assert meter.current == 0
        assert p2p.pool.allocated * boundary == memory.predict_comm(runtime.actions, boundary)


# ---------------------------------------------------------------- static parts, one rank


@pytest.mark.parametrize(
    ("dtype", "zero", "dp", "per_param"),
    [
        (torch.float32, 0, 1, (4, 4, 8)),
        (torch.float64, 0, 2, (8, 8, 16)),
        (torch.bfloat16, 0, 2, (2, 4, 12)),  # fp32 grads; masters + two fp32 moments
        (torch.float16, 1, 2, (2, 4, 6)),  # ZeRO-1: the optimizer part over 2 dp ranks
        (torch.float32, 1, 4, (4, 4, 2)),
    ],
)
def test_predict_static_formula(dtype, zero, dp, per_param):
    n = 1000
    got = memory.predict_static([600, 400], dtype, zero, dp)
    assert (got["params"], got["grads"], got["optimizer"]) == tuple(n * b for b in per_param)


def test_measure_static_counts_storages_once():
    flat = torch.zeros(100)
    params = [flat[:60].view(6, 10), flat[60:]]  # views of one flat buffer
    grads = [torch.zeros(100, dtype=torch.float64)]
    optimizer = [torch.zeros(100), torch.zeros(100), grads[0]]  # a grad listed twice
    got = memory.measure_static({"params": params, "grads": grads, "optimizer": optimizer})
    assert got == {"params": 400, "grads": 800, "optimizer": 800}
    record = memory.measure({"params": params, "grads": grads, "optimizer": optimizer}, 123)
    assert set(record) == set(memory.MEASURED_KEYS)
    assert record["total"] == 400 + 800 + 800 + 123


def test_predict_rank_and_table():
    K, M = 2, 4
    config = build_config(
        {
            "model": {"n_layers": 3, "d_model": 16, "n_heads": 2, "seq_len": 8},
            "train": {"global_batch": BATCH * M, "dtype": "float64"},
            "parallel": {"pp": K},
            "schedule": {"name": "1f1b", "microbatches": M},
        }
    )
    partition = partition_layers(layer_costs(SPEC, config.model), K)
    blueprint = SimpleNamespace(
        spec=SPEC,
        model=config.model,
        partition=partition,
        schedule=build_schedule("1f1b", K, M),
        num_stages=K,
        microbatch_size=BATCH,
    )
    predictions = [memory.predict_rank(blueprint, config, r) for r in range(K)]
    for r, p in enumerate(predictions):
        stage = build_stage(SPEC, config.model, partition.layers(r))
        numel = sum(t.numel() for t in stage.parameters())
        assert p["params"] == 8 * numel and p["optimizer"] == 16 * numel
        per = p["per_microbatch"][r].forward
        assert p["activations"] == (K - r) * per  # 1F1B: K - rank micro-batches at the peak
        assert p["peak_microbatches"] == K - r
        boundary = BATCH * 8 * 16 * 8
        assert p["comm"] == memory.predict_comm(blueprint.schedule[r], boundary) > 0
        parts = ("params", "grads", "optimizer", "activations", "comm")
        assert p["total"] == sum(p[k] for k in parts)
    table = memory.describe(predictions)
    assert "activations" in table and len(table.splitlines()) == 2 + K


def test_monitor_on_cpu():
    x = torch.randn(10, requires_grad=True)
    monitor = memory.MemoryMonitor("cpu")
    monitor.begin_step()
    with monitor.meter:
        y = x.exp()
    y.sum().backward()
    assert monitor.after_backward() == x.nbytes
    record = monitor.measure({"params": [x], "grads": [x.grad], "optimizer": []})
    assert record == {
        "params": 40,
        "grads": 40,
        "optimizer": 0,
        "activations": 40,
        "total": 120,
    }
