"""Validation on one process: the forward-only schedule, the held-out split, the oracle, the CLI.

The layouts (pp 2 and 4, dp2 x tp2, interleaved) are in test_eval_mpi.py.
"""

import json
import math

import numpy as np
import pytest
import torch
from mpi4py import MPI

from hpcpipe import data
from hpcpipe.cli.main import main
from hpcpipe.config import ConfigError, build_config
from hpcpipe.models.api import build_stage, layer_costs
from hpcpipe.models.gpt2 import SPEC, GPT2Config
from hpcpipe.models.gpt2.model import loss_fn
from hpcpipe.parallel.grid import Grid, Topology
from hpcpipe.pipeline import draw
from hpcpipe.pipeline.partition import partition_layers
from hpcpipe.pipeline.runtime import PipelineRuntime
from hpcpipe.pipeline.schedule import (
    FORWARD_ONLY,
    Action,
    Kind,
    ScheduleError,
    build_schedule,
    forward_only_schedule,
    validate,
)
from hpcpipe.pipeline.simulate import Costs, simulate
from hpcpipe.train import evaluate as evaluation
from hpcpipe.train import state as train_state
from hpcpipe.train.loop import format_record
from hpcpipe.train.serial import SerialTrainer
from hpcpipe.train.trainer import PipelineTrainer, make_blueprint

TOKENS = data.load_tokens(None, max_bytes=32 * 1024)
MODEL = {"n_layers": 2, "d_model": 16, "n_heads": 2, "seq_len": 8}


def config(**sections):
    tables = {
        "model": dict(MODEL),
        "train": {"global_batch": 8, "steps": 4, "dtype": "float64", "seed": 3,
                  "eval_batches": 3},
        "schedule": {"microbatches": 2},
        "data": {"max_bytes": 32 * 1024},
    }  # fmt: skip
    for section, values in sections.items():
        tables.setdefault(section, {}).update(values)
    return build_config(tables)


def one_rank_trainer(cfg, tokens=TOKENS) -> PipelineTrainer:
    grid = Grid(MPI.COMM_SELF, Topology(1, 1, 1))
    return PipelineTrainer(cfg, grid, make_blueprint(cfg, 1), tokens=tokens)


# ---------------------------------------------------------------- the forward-only schedule


@pytest.mark.parametrize("K", range(1, 9))
def test_forward_only_schedule_validates_over_the_grid(K):
    """K <= 8, M <= 16, V 1 and 2: every F once with its sends and receives, no backward."""
    for M in range(1, 17):
        for V in (1, 2):
            schedule = forward_only_schedule(K, M, V)
            assert schedule == build_schedule(FORWARD_ONLY, K, M, V)
            report = validate(schedule, K, M, V, forward_only=True)
            last = K * V - 1
            for r in range(K):
                stages = range(r, K * V, K)
                kinds = {a.kind for a in schedule[r]}
                assert kinds <= {Kind.F, Kind.SEND_F, Kind.RECV_F}, (K, M, V, r)
                computes = sorted((a.stage, a.microbatch) for a in schedule[r] if a.is_compute)
                assert computes == [(s, m) for s in stages for m in range(M)]
                sends = sum(a.kind == Kind.SEND_F for a in schedule[r])
                recvs = sum(a.kind == Kind.RECV_F for a in schedule[r])
                assert sends == (0 if K == 1 else M * sum(s < last for s in stages))
                assert recvs == (0 if K == 1 else M * sum(s > 0 for s in stages))
            assert report.peak_activations == dict.fromkeys(range(K), 1)


def test_forward_only_order_is_depth_first_in_groups_of_k():
    schedule = forward_only_schedule(2, 4, 2)
    order = [str(a) for a in schedule[0] if a.is_compute]
    assert order == ["0F0", "0F1", "2F0", "2F1", "0F2", "0F3", "2F2", "2F3"]
    assert [str(a) for a in schedule[1][:3]] == ["1RECV_F0", "1RECV_F1", "1F0"]


def broken(K=2, M=3, V=1):
    return {r: list(a) for r, a in forward_only_schedule(K, M, V).items()}


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s[1].remove(Action(1, Kind.F, 1)), "1F1: missing"),
        (lambda s: s[0].append(Action(0, Kind.B, 0)), "no backward actions"),
        (lambda s: s[0].append(Action(0, Kind.F, 2)), "appears 2 times"),
        (lambda s: s[1].remove(Action(1, Kind.RECV_F, 0)), "missing 1RECV_F0"),
        (lambda s: s[0].remove(Action(0, Kind.SEND_F, 2)), "missing 0SEND_F2"),
        (lambda s: s[1].append(Action(1, Kind.RECV_F, 0)), "must come before"),
        (lambda s: s[0].append(Action(0, Kind.SEND_B, 0)), "no backward actions"),
    ],
)
def test_malformed_forward_only_schedules_are_refused(change, message):
    schedule = broken()
    change(schedule)
    with pytest.raises(ScheduleError, match=message) as info:
        validate(schedule, 2, 3, 1, forward_only=True)
    assert "rank 0 |" in str(info.value)  # the grid with the failing action marked


def test_forward_only_deadlock_is_refused():
    """Rank 0 runs its second chunk first: 2F0 waits for 1F0, which waits for 0F0."""
    schedule = broken(2, 2, 2)
    schedule[0] = [a for a in schedule[0] if a.stage == 2] + [
        a for a in schedule[0] if a.stage != 2
    ]
    with pytest.raises(ScheduleError, match="deadlock at tick 0: rank 0 stuck on 2F0"):
        validate(schedule, 2, 2, 2, forward_only=True)


def test_training_and_forward_only_checks_do_not_mix():
    with pytest.raises(ScheduleError, match="no backward actions"):
        validate(build_schedule("1f1b", 2, 3), 2, 3, forward_only=True)
    with pytest.raises(ScheduleError, match="0B0: missing"):
        validate(forward_only_schedule(2, 3), 2, 3)
    with pytest.raises(ScheduleError, match="K \\(ranks\\) must be an integer >= 1"):
        forward_only_schedule(0, 3)
    with pytest.raises(ScheduleError, match="unknown schedule 'forward'.*forward-only"):
        build_schedule("forward", 2, 3)


def test_forward_only_simulates_and_draws(tmp_path):
    K, M = 4, 6
    schedule = forward_only_schedule(K, M)
    sim = simulate(schedule, K, M, 1, Costs(1, 0, 0, 0))
    assert sim.step_time == M + K - 1
    assert sim.bubble_rate == pytest.approx((K - 1) / (M + K - 1))  # as GPipe's and 1F1B's
    assert sim.peak_activations == dict.fromkeys(range(K), 1)
    trace = draw.to_chrome_trace(sim.timeline, K, draw.timeline_arrows(sim.timeline))
    assert sum(e["ph"] == "X" for e in trace["traceEvents"]) == K * M
    assert sum(e["ph"] == "s" for e in trace["traceEvents"]) == (K - 1) * M
    assert draw.to_json(schedule, K, M, 1, sim)["schedule"][1][0] == "1RECV_F0"
    pytest.importorskip("matplotlib")
    draw.to_png(sim.timeline, K, tmp_path / "fwd.png", title="forward-only")
    assert (tmp_path / "fwd.png").stat().st_size > 0


def test_schedule_command_draws_forward_only(capsys):
    args = ["schedule", "--schedule", "forward-only", "--stages", "2", "--microbatches", "3"]
    assert main(args) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("rank 0 | 0F0 0F1 0F2")
    assert main([*args, "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["peak_activations"] == [1, 1] and out["costs"][1:3] == [0.0, 0.0]


def test_training_refuses_the_forward_only_schedule():
    with pytest.raises(ConfigError, match="has no backward"):
        make_blueprint(config(schedule={"name": "forward-only"}), 1)


# ---------------------------------------------------------------- the runtime


def test_forward_only_runtime_keeps_nothing_for_backward():
    """K = 1, V = 2 (local hand-over): under enable_grad the loss still has no graph."""
    model = GPT2Config(**MODEL)
    partition = partition_layers(layer_costs(SPEC, model), 2)
    stages = {s: build_stage(SPEC, model, partition.layers(s), 3).double() for s in range(2)}
    runtime = PipelineRuntime(
        stages=stages, actions=forward_only_schedule(1, 4, 2)[0], num_stages=2, pp_size=1,
        p2p=None, activation_shape=(2, 8, 16), dtype=torch.float64,
        device=torch.device("cpu"), loss_fn=loss_fn, forward_only=True,
    )  # fmt: skip
    inputs, targets = data.make_batch(TOKENS, np.arange(8) * 8, 8)
    micro = data.split_microbatches(inputs, targets, 4)
    with torch.enable_grad():
        result = runtime.step(micro)
    assert result.peak_activations == 1
    assert runtime._held == 0 and not runtime._state
    assert all(p.grad is None for s in stages.values() for p in s.parameters())
    with torch.no_grad():
        whole = [loss_fn(stages[1](stages[0](x)), y).double() for x, y in micro]
    assert result.loss == pytest.approx(float(sum(whole) / 4), rel=1e-14)


def test_pipeline_evaluate_equals_the_oracle_and_changes_no_training_state():
    """pp = 1 (interleaved, V = 2: local hand-over) and 1f1b; every evaluation step."""
    for schedule, V in (("interleaved", 2), ("1f1b", 1)):
        cfg = config(schedule={"name": schedule, "virtual": V})
        trainer, plain, oracle = one_rank_trainer(cfg), one_rank_trainer(cfg), SerialTrainer(cfg)
        for _ in range(3):
            rng, sampler = torch.get_rng_state(), trainer.sampler.state_dict()
            grads = [None if p.grad is None else p.grad.clone() for p in trainer.params]
            got, want = trainer.evaluate(), oracle.evaluate()
            assert abs(got - want) <= 1e-12 * want
            assert torch.equal(torch.get_rng_state(), rng)
            assert trainer.sampler.state_dict() == sampler
            assert trainer.last_eval.peak_activations == 1
            for p, g in zip(trainer.params, grads, strict=True):  # no gradient touched
                assert (p.grad is None and g is None) or torch.equal(p.grad, g)
            assert trainer.train_step()["loss"] == plain.train_step()["loss"]  # bit for bit
            oracle.forward_backward()
            oracle.finish_step()
        assert trainer.evaluate() == trainer.evaluate()  # the same windows every time
        trainer.grid.free()
        plain.grid.free()


# ---------------------------------------------------------------- the held-out split


def test_holdout_windows_and_their_starts():
    assert data.holdout_windows(8 * 100 + 1, 8, 0.01) == 1
    assert data.holdout_windows(8 * 1000 + 1, 8, 0.01) == 10
    assert data.holdout_windows(8 * 1000 + 1, 8, 0.0) == 0
    assert data.holdout_windows(8 * 1000 + 1, 8, 1e-9) == 1  # at least one when asked
    starts = data.validation_starts(8 * 1000 + 1, 8, 10)
    assert starts.tolist() == [8 * w for w in range(990, 1000)]
    with pytest.raises(ValueError, match="cannot hold out 1"):
        data.validation_starts(8, 8, 1)


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5])
def test_sampler_never_draws_the_held_out_windows(fraction):
    """Three epochs of training batches and the validation windows are disjoint, and
    together they are every window."""
    num_tokens, seq_len, batch = 8 * 640 + 5, 8, 16
    held = data.holdout_windows(num_tokens, seq_len, fraction)
    val = set(data.validation_starts(num_tokens, seq_len, held).tolist())
    sampler = data.Sampler(num_tokens, seq_len, batch, seed=1, holdout=held)
    drawn = set()
    for _ in range(3 * (640 - held) // batch):
        drawn.update(sampler.next_starts().tolist())
    assert not drawn & val
    assert drawn | val == {w * seq_len for w in range(640)}


def test_trainers_hold_out_the_same_windows_they_evaluate():
    cfg = config()
    trainer, oracle = one_rank_trainer(cfg), SerialTrainer(cfg, tokens=TOKENS)
    held = data.holdout_windows(len(TOKENS), 8, 0.01)
    assert trainer.sampler.holdout == oracle.sampler.holdout == held > 0
    trainer.evaluate()
    oracle.evaluate()
    val = trainer.validation.starts
    assert val.tolist() == oracle.validation.starts.tolist()
    assert val.tolist() == data.validation_starts(len(TOKENS), 8, held).tolist()
    trained = set()
    for _ in range(2 * trainer.sampler.num_windows // 8 + 1):  # over two epochs
        trained.update(trainer.sampler.next_starts().tolist())
    assert not trained & set(val.tolist())
    trainer.grid.free()


def test_eval_batches_are_fixed_and_cycle_when_windows_run_short():
    cfg = config(train={"eval_batches": 4})
    val = evaluation.ValidationSet(TOKENS, np.array([0, 8, 16, 24, 32]), "five windows")
    batches = evaluation.eval_starts(val, cfg)
    assert [b.tolist() for b in batches] == [[0, 8, 16, 24, 32, 0, 8, 16],
                                             [24, 32, 0, 8, 16, 24, 32, 0],
                                             [8, 16, 24, 32, 0, 8, 16, 24],
                                             [32, 0, 8, 16, 24, 32, 0, 8]]  # fmt: skip
    assert [b.tolist() for b in evaluation.eval_starts(val, cfg)] == [b.tolist() for b in batches]
    parts = [evaluation.microbatches(val, cfg, r, dp=2) for r in (0, 1)]
    assert len(parts[0]) == 4 * 2 and parts[0][0][0].shape == (2, 8)
    assert torch.equal(parts[1][0][0][0], torch.from_numpy(TOKENS[32:40].astype(np.int64)))


def test_val_path_replaces_the_held_out_fraction(tmp_path):
    path = tmp_path / "val.h5"
    val_tokens = data.ByteTokenizer().encode("held-out text, not the training corpus. " * 20)
    data.write_dataset(val_tokens, path, data.ByteTokenizer(), ["val"])
    cfg = config(data={"val_path": str(path)}, train={"eval_every": 2})
    oracle = SerialTrainer(cfg, tokens=TOKENS)
    assert oracle.sampler.holdout == 0  # the training tokens are all trained on
    got = oracle.evaluate()
    windows = (len(val_tokens) - 1) // 8
    assert oracle.validation.starts.tolist() == [8 * w for w in range(windows)]
    picks = [(8 * (i % windows)) for i in range(3 * 8)]
    x, y = data.make_batch(val_tokens, picks, 8)
    with torch.no_grad():
        losses = [SPEC.loss(oracle.compute(a), b) for a, b in data.split_microbatches(x, y, 6)]
    assert got == pytest.approx(float(sum(losses) / 6), rel=1e-12)
    trainer = one_rank_trainer(cfg)
    assert abs(trainer.evaluate() - got) <= 1e-12 * got
    trainer.grid.free()
    with pytest.raises(ConfigError, match="data.val_path=.*does not exist"):
        make_blueprint(config(data={"val_path": str(tmp_path / "missing.h5")}), 1)


# ---------------------------------------------------------------- config, loop, CLI


def test_evaluation_keys_defaults_and_errors():
    cfg = config()
    assert (cfg.data.val_fraction, cfg.data.val_path) == (0.01, "")
    assert (cfg.train.eval_every, config(train={"eval_batches": 4}).train.eval_batches) == (0, 4)
    with pytest.raises(ConfigError, match="needs validation data"):
        config(train={"eval_every": 5}, data={"val_fraction": 0})
    with pytest.raises(ConfigError, match="val_fraction=1.0 must be in"):
        config(data={"val_fraction": 1.0})
    with pytest.raises(ConfigError, match="eval_batches must be >= 1"):
        config(train={"eval_batches": 0})
    with pytest.raises(ConfigError, match="eval_every must be >= 0"):
        config(train={"eval_every": -1})
    with pytest.raises(ValueError, match="no validation data"):
        SerialTrainer(config(data={"val_fraction": 0}), tokens=TOKENS).evaluate()


def test_evaluation_is_due_every_n_steps_and_after_the_last():
    cfg = config(train={"eval_every": 3, "steps": 7})
    due = [s for s in range(1, 8) if evaluation.due(s, cfg, last=s == 7)]
    assert due == [3, 6, 7]
    assert not any(evaluation.due(s, config(), last=s == 4) for s in range(1, 5))
    assert evaluation.metrics(2.0) == {"val_loss": 2.0, "val_ppl": math.exp(2.0)}


def test_progress_line_shows_val_loss():
    record = {"step": 4, "loss": 3.0, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 100.0,
              "bubble": 0.1, "step_time": 0.2, **evaluation.metrics(2.5)}  # fmt: skip
    assert f"val_loss 2.5000 (ppl {math.exp(2.5):.2f})" in format_record(record, 10)
    del record["val_loss"]
    assert "val_loss" not in format_record(record, 10)


def test_hpcpipe_eval_on_one_process(tmp_path, capsys):
    """A checkpoint saved here: `hpcpipe eval` gives the trainer's own val_loss, as text and
    JSON; a layout it cannot run and missing validation data are configuration errors."""
    cfg = config(checkpoint={"dir": str(tmp_path / "ck")})
    trainer = one_rank_trainer(cfg)
    trainer.train_step()
    trainer.train_step()
    want = trainer.evaluate()
    train_state.save(trainer, cfg.checkpoint.dir)
    trainer.grid.free()
    ck = str(tmp_path / "ck")
    assert main(["eval", "--checkpoint", ck, "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["step"] == 2 and out["windows"] == 24 and out["dtype"] == "float64"
    assert abs(out["val_loss"] - want) <= 1e-12 * want
    assert out["val_ppl"] == pytest.approx(math.exp(want))
    assert main(["eval", "--checkpoint", ck, "--schedule", "interleaved",
                 "--schedule.virtual=2"]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert f"val_loss {want:.6f}" in text and "(step 2)" in text and "virtual=2" in text
    assert main(["eval", "--checkpoint", ck, "--data.val_fraction=0"]) == 2
    assert "nothing to evaluate on" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", ck, "--pp", "2"]) == 2
    assert "MPI processes" in capsys.readouterr().err
