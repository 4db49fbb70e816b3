"""Mixed precision and the sharded optimizer's pure logic (no MPI): what the masters buy, the
loss scaler's rules, and ZeRO fragments cut into checkpoint boxes."""

import math
import random

import pytest
import torch
from precision_helpers import PureHalfTrainer

from hpcpipe import data
from hpcpipe.config import ConfigError, build_config
from hpcpipe.train.precision import LossScaler
from hpcpipe.train.serial import SerialTrainer
from hpcpipe.train.state import flat_boxes, fragment_pieces

TINY = {"n_layers": 2, "d_model": 32, "n_heads": 2, "seq_len": 16}


def tiny_config(**train):
    return build_config({"model": TINY, "train": {"global_batch": 4, "steps": 4, **train},
                         "schedule": {"microbatches": 2}})  # fmt: skip


@pytest.fixture(scope="module")
def tokens():
    return data.load_tokens(None, max_bytes=32 * 1024)


def changed_fraction(before: dict, after: dict) -> float:
    changed = sum(int((before[n] != after[n]).sum()) for n in before)
    return changed / sum(t.numel() for t in before.values())


def test_bf16_masters_keep_updates_that_bf16_storage_loses(tokens):
    """An AdamW step of lr 1e-6 moves a weight of ~0.02 by 0.005 %, far below bfloat16's
    0.4 % resolution: pure-bf16 storage drops nearly all of it, fp32 masters keep every one."""
    torch.manual_seed(0)
    config = tiny_config(dtype="bfloat16", lr=1e-6, min_lr=1e-6, warmup_steps=0)
    torch.set_num_threads(1)
    mixed, pure = SerialTrainer(config, tokens=tokens), PureHalfTrainer(config, tokens=tokens)
    assert {p.dtype for p in mixed.model.parameters()} == {torch.float32}  # the masters
    assert {p.dtype for p in mixed.compute.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in pure.model.parameters()} == {torch.bfloat16}
    fractions = {}
    for name, trainer in (("mixed", mixed), ("pure", pure)):
        before = trainer.params()
        trainer.forward_backward()
        trainer.finish_step()
        fractions[name] = changed_fraction(before, trainer.params())
    assert fractions["mixed"] > 0.99
    assert fractions["pure"] < 0.05  # only weights within ~5e-4 of zero move


def test_bf16_mixed_compute_tracks_float32(tokens):
    """A few steps in bf16 compute with fp32 masters stay close to float32 training."""
    torch.set_num_threads(1)
    losses = {}
    for dtype in ("float32", "bfloat16"):
        trainer = SerialTrainer(tiny_config(dtype=dtype), tokens=tokens)
        for _ in range(4):
            losses[dtype] = trainer.forward_backward()
            trainer.finish_step()
    assert abs(losses["bfloat16"] / losses["float32"] - 1) < 0.02


def test_loss_scaler_backs_off_on_overflow_and_grows_after_a_window():
    scaler = LossScaler(initial=1024.0, window=3, backoff=0.5, enabled=True)
    scaler.update(overflow=True)
    assert scaler.scale == 512.0
    for _ in range(2):
        scaler.update(overflow=False)
    assert scaler.scale == 512.0  # two clean steps: not yet
    scaler.update(overflow=False)
    assert scaler.scale == 1024.0  # the third doubles it
    scaler.update(overflow=True)
    scaler.update(overflow=False)
    assert scaler.scale == 512.0  # an overflow restarts the window
    state = scaler.state_dict()
    other = LossScaler(initial=65536.0, window=3, backoff=0.5, enabled=True)
    other.load_state_dict(state)
    assert other.state_dict() == state


def test_loss_scaler_never_goes_below_one_and_is_off_outside_float16():
    scaler = LossScaler(initial=2.0, window=0, backoff=0.5, enabled=True)
    for _ in range(5):
        scaler.update(overflow=True)
    assert scaler.scale == 1.0
    off = LossScaler(initial=65536.0, window=1, backoff=0.5, enabled=False)
    off.update(overflow=False)
    assert off.scale == 1.0


@pytest.mark.parametrize("bad", [{"initial_loss_scale": 0}, {"loss_scale_backoff": 1.0}])
def test_bad_loss_scaling_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="loss_scale"):
        tiny_config(**bad)


def test_zero_must_be_0_or_1():
    with pytest.raises(ConfigError, match="parallel.zero=2 must be 0 or 1"):
        build_config({"parallel": {"zero": 2}})


@pytest.mark.parametrize("seed", range(40))
def test_flat_boxes_tile_a_flat_range_in_order(seed):
    """Any flat range of any shape is a short list of boxes, each contiguous, in order."""
    rng = random.Random(seed)
    shape = tuple(rng.randint(1, 5) for _ in range(rng.randint(0, 4)))
    total = math.prod(shape)
    start = rng.randint(0, total - 1)
    stop = rng.randint(start + 1, total)
    full = torch.arange(total).reshape(shape)
    pieces = []
    for offsets, box in flat_boxes(shape, start, stop):
        region = full
        for dim, (o, n) in enumerate(zip(offsets, box, strict=True)):
            region = region.narrow(dim, o, n)
        pieces.append(region.reshape(-1))
    assert torch.equal(torch.cat(pieces), torch.arange(start, stop))
    assert len(pieces) <= max(1, 2 * len(shape) - 1)


def test_fragment_pieces_drop_padding_rows():
    """A fragment of a vocabulary-padded local tensor saves only its real rows."""
    local = torch.arange(5 * 3, dtype=torch.float64).reshape(5, 3)  # rows 3 and 4: padding
    flat = local.reshape(-1)[4:14]
    pieces = fragment_pieces(flat, local.shape, 4, 14, real_shape=(3, 3))
    got = torch.zeros(3, 3)
    covered = 0
    for offsets, piece in pieces:
        rows, cols = piece.shape
        got[offsets[0] : offsets[0] + rows, offsets[1] : offsets[1] + cols] = piece
        covered += piece.numel()
    assert covered == 9 - 4  # elements 4..8 of the 3x3 real part
    assert torch.equal(got.reshape(-1)[4:9], local.reshape(-1)[4:9].float())
