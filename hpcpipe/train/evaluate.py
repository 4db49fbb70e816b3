"""Validation data: the held-out windows, the batches an evaluation runs, and its metrics.

The split is by windows (seq_len + 1 tokens at offsets k * seq_len, as the Sampler cuts them):
data.val_fraction holds out the LAST windows of the training tokens (the Sampler is told to
never draw them), or data.val_path names a token file whose windows are all for validation.
An evaluation runs train.eval_batches global batches of them, in file order (from the first
again when they run out), so every evaluation sees the same windows; nothing here touches
the training sampler or any random state. Each batch is cut like a training batch (a dp
replica's share, then schedule.microbatches micro-batches), and the loss is the mean over
every micro-batch and replica, as the training loss is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from hpcpipe import data
from hpcpipe.config import Config


@dataclass(frozen=True)
class ValidationSet:
    """The held-out windows: the tokens they lie in and their start offsets (file order)."""

    tokens: np.ndarray
    starts: np.ndarray
    source: str  # for messages: "the last N windows of ..." or the val_path file


def holdout(config: Config, tokens) -> int:
    """Windows of the training tokens held out (0 when data.val_path brings its own)."""
    d = config.data
    if d.val_path:
        return 0
    return data.holdout_windows(len(tokens), config.model.seq_len, d.val_fraction)


def training_sampler(config: Config, tokens) -> data.Sampler:
    """The training sampler: every window but the held-out ones."""
    t = config.train
    seq_len, held = config.model.seq_len, holdout(config, tokens)
    return data.Sampler(len(tokens), seq_len, t.global_batch, t.seed, holdout=held)


def validation_set(config: Config, tokens) -> ValidationSet:
    """The windows evaluation runs on: data.val_path's, else the training tokens' held-out."""
    d, seq_len = config.data, config.model.seq_len
    if d.val_path:
        val = data.load_tokens(d.val_path)
        windows = max(0, (len(val) - 1) // seq_len)
        try:
            starts = data.validation_starts(len(val), seq_len, windows)
        except ValueError as exc:
            raise ValueError(f"data.val_path={d.val_path}: {exc}") from None
        return ValidationSet(val, starts, d.val_path)
    held = holdout(config, tokens)
    if not held:
        raise ValueError(
            "no validation data: data.val_fraction is 0 and data.val_path is empty; set "
            "data.val_fraction > 0 (held-out windows) or data.val_path (a token file)"
        )
    starts = data.validation_starts(len(tokens), seq_len, held)
    return ValidationSet(tokens, starts, f"the last {held} windows of the training data")


def eval_starts(validation: ValidationSet, config: Config) -> list[np.ndarray]:
    """train.eval_batches global batches of window offsets: the held-out windows in order,
    from the first again when there are fewer than eval_batches x global_batch."""
    t = config.train
    picks = np.arange(t.eval_batches * t.global_batch) % len(validation.starts)
    return np.split(validation.starts[picks], t.eval_batches)


def microbatches(
    validation: ValidationSet, config: Config, dp_rank: int = 0, dp: int | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every micro-batch one dp replica evaluates: per batch its share, then M micro-batches."""
    dp = config.parallel.dp if dp is None else dp
    M, seq_len = config.schedule.microbatches, config.model.seq_len
    out = []
    for starts in eval_starts(validation, config):
        share = len(starts) // dp
        mine = starts[dp_rank * share : (dp_rank + 1) * share]
        inputs, targets = data.make_batch(validation.tokens, mine, seq_len)
        out += data.split_microbatches(inputs, targets, M)
    return out


def due(step: int, config: Config, last: bool) -> bool:
    """Whether the loop evaluates after `step` (counted from 1): every train.eval_every
    steps, and after the last step of the run, when eval_every is set."""
    every = config.train.eval_every
    return bool(every) and (step % every == 0 or last)


def metrics(loss: float) -> dict[str, float]:
    """What an evaluation adds to the step's record: val_loss and val_ppl = exp(val_loss)."""
    try:
        ppl = math.exp(loss)
    except OverflowError:
        ppl = math.inf
    return {"val_loss": loss, "val_ppl": ppl}
