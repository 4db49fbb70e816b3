"""hpcpipe's optimizer and LR schedule against torch's own, built independently, step by step.

The reference path never touches hpcpipe.train.optim: its AdamW parameter groups are written
out here, its learning rate comes from torch.optim.lr_scheduler (SequentialLR of LinearLR
warm-up, CosineAnnealingLR decay and, past train.steps, ConstantLR at min_lr), its clipping is
torch.nn.utils.clip_grad_norm_ and its loss is F.cross_entropy. It shares with hpcpipe only
the model (build_model) and the data (data.Sampler / make_batch), which are not under test.

The reference schedule is itself checked against values computed by hand, so a wrong
reference cannot pass by agreeing with a wrong hpcpipe.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.optim import lr_scheduler

from hpcpipe import data
from hpcpipe.config import TrainSection, build_config
from hpcpipe.models.api import build_model
from hpcpipe.models.gpt2 import SPEC
from hpcpipe.train.optim import lr_at
from hpcpipe.train.serial import SerialTrainer

MODEL = {"n_layers": 2, "d_model": 16, "n_heads": 2, "seq_len": 8}
REL = 1e-12  # float64: only rounding may differ (torch's recursive cosine vs lr_at's closed form)
FOREVER = 10**9


# ---------------------------------------------------------------- the reference schedule


def torch_schedule(optimizer, train, hold_min_lr: bool = True):
    """torch's schedulers for: warm-up lr/W, 2lr/W, .., lr over steps 0..W-1, cosine to min_lr.

    LinearLR's total_iters counts increments, so a ramp whose W values run 1/W .. 1 takes
    total_iters = W - 1. CosineAnnealingLR starts at lr at step W and reaches min_lr after
    T_max = steps - W increments, at step `steps`. It is periodic (it climbs back after T_max),
    so with hold_min_lr a ConstantLR keeps min_lr from step `steps` on.
    """
    W, S, lr, min_lr = train.warmup_steps, train.steps, train.lr, train.min_lr
    phases, milestones = [], []
    if W > 0:
        phases.append(
            lr_scheduler.LinearLR(optimizer, start_factor=1 / W, end_factor=1.0, total_iters=W - 1)
        )
        milestones.append(W)
    phases.append(lr_scheduler.CosineAnnealingLR(optimizer, T_max=S - W, eta_min=min_lr))
    if hold_min_lr:
        milestones.append(S)
        phases.append(lr_scheduler.ConstantLR(optimizer, factor=min_lr / lr, total_iters=FOREVER))
    return lr_scheduler.SequentialLR(optimizer, phases, milestones=milestones)


def torch_lrs(train, n: int, hold_min_lr: bool = True, scheduler=torch_schedule) -> list[float]:
    """The learning rate torch's schedule gives at steps 0..n-1 (on a dummy optimizer)."""
    param = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    optimizer = torch.optim.AdamW([param], lr=train.lr)
    schedule = scheduler(optimizer, train, hold_min_lr)
    lrs = []
    for _ in range(n):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()  # no gradient: a no-op, but torch wants it before schedule.step()
        schedule.step()
    return lrs


def train_section(warmup, steps, lr=1e-2, min_lr=1e-3) -> TrainSection:
    return TrainSection(lr=lr, min_lr=min_lr, warmup_steps=warmup, steps=steps)


def test_reference_schedule_against_hand_computed_values():
    t = train_section(warmup=3, steps=8)
    # cos(pi/5) = (1 + sqrt 5) / 4, cos(2 pi/5) = (sqrt 5 - 1) / 4; amplitude (lr - min_lr)/2
    c1, c2, half = (1 + math.sqrt(5)) / 4, (math.sqrt(5) - 1) / 4, 0.0045
    expected = [
        0.01 / 3, 0.02 / 3, 0.01,  # warm-up: lr (k+1)/W
        0.01,  # step W: cosine at progress 0
        0.001 + half * (1 + c1), 0.001 + half * (1 + c2),
        0.001 + half * (1 - c2), 0.001 + half * (1 - c1),
        0.001, 0.001, 0.001, 0.001,  # min_lr from step S on
    ]  # fmt: skip
    assert torch_lrs(t, len(expected)) == pytest.approx(expected, rel=REL)
    # no warm-up: cosine from lr at step 0 to min_lr at step S = 4 (0.001 + 0.0045 (1 + cos))
    t0 = train_section(warmup=0, steps=4)
    expected0 = [0.01, 0.001 + half * (1 + math.sqrt(0.5)), 0.0055,
                 0.001 + half * (1 - math.sqrt(0.5)), 0.001, 0.001]  # fmt: skip
    assert torch_lrs(t0, len(expected0)) == pytest.approx(expected0, rel=REL)


# ---------------------------------------------------------------- lr_at against torch


@pytest.mark.parametrize("warmup,steps", [(3, 8), (1, 5), (0, 4), (2, 3), (4, 20), (5, 6)])
def test_lr_at_equals_torch_schedule(warmup, steps):
    t = train_section(warmup, steps)
    beyond = steps + 7
    reference = torch_lrs(t, beyond + 1)
    boundaries = sorted({0, max(warmup - 1, 0), warmup, steps - 1, steps, steps + 1, beyond})
    for step in boundaries:
        assert lr_at(step, t) == pytest.approx(reference[step], rel=REL), step
    assert [lr_at(s, t) for s in range(beyond + 1)] == pytest.approx(reference, rel=REL)


def test_documented_difference_torch_cosine_climbs_back_after_steps_lr_at_holds_min_lr():
    t = train_section(warmup=3, steps=8)
    periodic = torch_lrs(t, 16, hold_min_lr=False)
    assert periodic[8] == pytest.approx(t.min_lr, rel=REL)
    assert periodic[9] > 1.8 * t.min_lr and periodic[13] == pytest.approx(t.lr, rel=REL)
    assert [lr_at(s, t) for s in range(8, 16)] == [t.min_lr] * 8


def test_documented_difference_warmup_peaks_one_step_before_linearlr_over_warmup_steps():
    """LinearLR(1/W -> 1, total_iters=W) reaches lr at step W; lr_at reaches it at W - 1."""

    def linear_over_w(optimizer, train, hold_min_lr):
        W, S = train.warmup_steps, train.steps
        ramp = lr_scheduler.LinearLR(optimizer, start_factor=1 / W, total_iters=W)
        decay = lr_scheduler.CosineAnnealingLR(optimizer, T_max=S - W, eta_min=train.min_lr)
        return lr_scheduler.SequentialLR(optimizer, [ramp, decay], milestones=[W])

    t = train_section(warmup=3, steps=8)
    literal = torch_lrs(t, 9, scheduler=linear_over_w)
    ours = [lr_at(s, t) for s in range(9)]
    assert literal[:3] == pytest.approx([0.01 / 3, 0.01 * 5 / 9, 0.01 * 7 / 9], rel=REL)
    assert ours[:3] == pytest.approx([0.01 / 3, 0.02 / 3, 0.01], rel=REL)
    assert ours[0] == pytest.approx(literal[0], rel=REL)
    assert ours[3:] == pytest.approx(literal[3:], rel=REL)  # equal again from step W
    # the peak is used on two steps, W - 1 and W (the cosine's start rounds to lr + 1 ulp)
    assert ours[2] == t.lr and ours[3] == pytest.approx(t.lr, rel=REL)


def test_documented_min_lr_is_reached_at_step_train_steps_which_no_run_executes():
    """Training runs steps 0..steps-1; the cosine reaches min_lr only at step `steps`."""
    t = train_section(warmup=3, steps=8)
    last = lr_at(t.steps - 1, t)
    assert last == pytest.approx(t.min_lr + 0.0045 * (1 - (1 + math.sqrt(5)) / 4), rel=REL)
    assert last > 1.8 * t.min_lr
    assert lr_at(t.steps, t) == t.min_lr


# ---------------------------------------------------------------- training, step by step


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Equal to REL of the tensor's scale (entrywise relative error is meaningless at zeros)."""
    assert actual.dtype == expected.dtype == torch.float64, what
    assert actual.shape == expected.shape, what
    scale = float(expected.abs().max())
    error = float((actual - expected).abs().max())
    assert error <= REL * scale, f"{what}: max error {error:.3g} vs scale {scale:.3g}"


def config_for(warmup, steps, grad_clip):
    train = {
        "global_batch": 4, "dtype": "float64", "seed": 5, "steps": steps,
        "warmup_steps": warmup, "lr": 1e-2, "min_lr": 1e-3, "grad_clip": grad_clip,
        # none of these is torch's default, so a value that is not passed through shows
        "beta1": 0.8, "beta2": 0.99, "weight_decay": 0.2,
    }  # fmt: skip
    return build_config({"model": MODEL, "train": train, "schedule": {"microbatches": 2}})


@pytest.mark.parametrize("warmup,steps,grad_clip", [(3, 8, 1.3), (0, 5, 0.0)])
def test_serial_training_matches_torch_adamw_step_by_step(warmup, steps, grad_clip):
    torch.set_num_threads(1)
    config = config_for(warmup, steps, grad_clip)
    t, M, T = config.train, config.schedule.microbatches, config.model.seq_len
    tokens = data.load_tokens(None, max_bytes=16 * 1024)
    trainer = SerialTrainer(config, tokens=tokens)

    # the reference: its own copy of the model, optimizer, schedule and data stream
    ref = build_model(SPEC, config.model, t.seed, dtype=torch.float64)
    named = dict(ref.named_parameters())  # the tied matrix once, as layers.0.tok.weight
    decay = [n for n, p in named.items() if p.dim() >= 2]
    no_decay = [n for n, p in named.items() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": [named[n] for n in decay], "weight_decay": t.weight_decay},
            {"params": [named[n] for n in no_decay], "weight_decay": 0.0},
        ],
        lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8,
    )  # fmt: skip
    schedule = torch_schedule(optimizer, t)
    held = data.holdout_windows(len(tokens), T, config.data.val_fraction)  # validation's
    sampler = data.Sampler(len(tokens), T, t.global_batch, t.seed, holdout=held)

    # hpcpipe's groups hold the same parameters with the same hyper-parameters
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    groups = trainer.optimizer.param_groups
    assert [sorted(names[id(p)] for p in g["params"]) for g in groups] == [
        sorted(decay),
        sorted(no_decay),
    ]
    assert [g["weight_decay"] for g in groups] == [t.weight_decay, 0.0]
    assert all(g["betas"] == (t.beta1, t.beta2) and g["eps"] == 1e-8 for g in groups)
    assert all(not g["amsgrad"] and not g["maximize"] for g in groups)
    for name, p in trainer.params().items():
        assert torch.equal(p, ref.get_parameter(name)), name

    clipped = []
    for step in range(steps + 3):  # past train.steps: lr holds at min_lr
        loss = trainer.forward_backward()
        raw_grads = trainer.grads()
        norm = trainer.finish_step()
        lrs = [g["lr"] for g in trainer.optimizer.param_groups]

        inputs, targets = data.make_batch(tokens, sampler.next_starts(), T)
        optimizer.zero_grad(set_to_none=True)
        ref_loss = 0.0
        for x, y in zip(inputs.chunk(M), targets.chunk(M), strict=True):
            part = F.cross_entropy(ref(x).flatten(0, 1), y.flatten()) / M
            part.backward()
            ref_loss += part.item()
        every = dict(ref.named_parameters(remove_duplicate=False))  # tied names too
        ref_raw = {n: p.grad.clone() for n, p in every.items()}
        if grad_clip > 0:
            ref_norm = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), grad_clip))
        else:
            ref_norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in ref.parameters()))
        ref_clipped = {n: p.grad.clone() for n, p in every.items()}
        ref_lr = optimizer.param_groups[0]["lr"]
        assert all(g["lr"] == ref_lr for g in optimizer.param_groups)
        optimizer.step()
        schedule.step()

        where = f"step {step}"
        assert lrs == [lr_at(step, t)] * 2, where
        assert lrs[0] == pytest.approx(ref_lr, rel=REL), where
        assert loss == pytest.approx(ref_loss, rel=REL), where
        assert norm == pytest.approx(ref_norm, rel=REL), where
        assert raw_grads.keys() == ref_raw.keys()
        for name in ref_raw:
            assert_close(raw_grads[name], ref_raw[name], f"{where} grad {name}")
            assert_close(trainer.grads()[name], ref_clipped[name], f"{where} clipped {name}")
        for name, p in trainer.params().items():
            assert_close(p, every[name].detach(), f"{where} param {name}")
        clipped.append(grad_clip > 0 and ref_norm > grad_clip)

    if grad_clip > 0:  # the run covers both branches of clipping
        assert any(clipped) and not all(clipped), clipped
