"""Master weights and the optimizer step: mixed precision, ZeRO-1 shards, fp16 loss scaling.

The optimizer never sees a model parameter. It updates *fragments*: 1-D views into a flat
master buffer per gradient bucket, covering the range of the bucket this rank owns (the whole
bucket without ZeRO, 1/dp of it with `parallel.zero = 1`, as Megatron's distributed optimizer).

- float32/float64: the master buffer is the bucket's parameter buffer itself (no copy).
- bfloat16/float16: the masters are float32 copies; AdamW's moments are float32; gradients
  arrive in float32 (see parallel/data_parallel.py); after each step the 16-bit parameters are
  re-derived from the masters. This is how Megatron, DeepSpeed and torchtitan train.

AdamW is elementwise, so AdamW over fragments equals AdamW over whole parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from hpcpipe.config import HALF, TrainSection
from hpcpipe.parallel.data_parallel import Bucket, GradReducer
from hpcpipe.train import optim


@dataclass
class Fragment:
    """The flat range [start, stop) of one parameter (its local, padded tensor) owned here."""

    name: str
    param: nn.Parameter
    start: int
    stop: int
    master: torch.Tensor  # 1-D; its .grad is the matching range of the reduced gradient


class LossScaler:
    """Dynamic loss scaling for float16 (as Megatron's DynamicGradScaler / torch's GradScaler).

    An overflowing step is skipped and the scale backs off; after `window` clean steps in a row
    it grows by 2. bfloat16/float32 runs use the constant scale 1.
    """

    def __init__(self, initial: float, window: int, backoff: float, enabled: bool):
        self.scale = float(initial) if enabled else 1.0
        self.window, self.backoff, self.enabled = window, backoff, enabled
        self.good_steps = 0

    def update(self, overflow: bool) -> None:
        if not self.enabled:
            return
        if overflow:
            self.scale = max(1.0, self.scale * self.backoff)
            self.good_steps = 0
            return
        self.good_steps += 1
        if self.window and self.good_steps % self.window == 0:
            self.scale *= 2.0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        if self.enabled and state:
            self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])


def _master_shard(bucket: Bucket, dtype: torch.dtype) -> torch.Tensor:
    """This rank's master range of a bucket: a float32 copy for 16-bit, else the params."""
    lo, hi = bucket.shard
    if dtype in HALF:
        return bucket.param[lo:hi].float().clone()  # still the full-precision initial values
    return bucket.param[lo:hi]


def make_fragments(reducer: GradReducer, names: dict[int, str], dtype: torch.dtype):
    """Fragments of every bucket, made while the buckets still hold full-precision values."""
    fragments, shards = [], []
    for bucket in reducer.buckets:
        lo, hi = bucket.shard
        master = _master_shard(bucket, dtype)
        shards.append((bucket, master))
        for i, p in enumerate(bucket.params):
            begin, end = bucket.offsets[i], bucket.offsets[i] + p.numel()
            a, b = max(begin, lo), min(end, hi)
            if a >= b:
                continue
            piece = master[a - lo : b - lo]
            piece.grad = bucket.grad_shard[a - lo : b - lo]
            fragments.append(Fragment(names[id(p)], p, a - begin, b - begin, piece))
    return fragments, shards


class MasterOptimizer:
    """AdamW over this rank's fragments, with clipping, loss scaling and the param refresh."""

    def __init__(self, named_params, reducer: GradReducer, train: TrainSection, dtype):
        """The buckets must still hold the full-precision initial parameters; for a 16-bit
        dtype they are copied into the masters and then stored in 16 bits."""
        self.reducer, self.dtype = reducer, dtype
        names = {id(p): n for n, p in named_params}
        self.fragments, self.shards = make_fragments(reducer, names, dtype)
        for bucket in reducer.buckets:
            bucket.cast(dtype)
        self.optimizer = optim.make_adamw(
            [(f"{f.name}@{f.start}", f.master, f.param.dim() >= 2) for f in self.fragments], train
        )
        self.scaler = LossScaler(
            train.initial_loss_scale, train.loss_scale_window, train.loss_scale_backoff,
            enabled=dtype == torch.float16,
        )  # fmt: skip

    def square_sum(self, counted) -> float:
        """Sum of squared gradients of the fragments of parameters in `counted` (ids)."""
        grads = [f.master.grad for f in self.fragments if id(f.param) in counted]
        return optim.grad_square_sum_of(grads)

    def step(self, square_sum: float, max_norm: float, lr: float) -> dict:
        """Unscale, clip, AdamW, refresh the model parameters; square_sum is the global one."""
        scale = self.scaler.scale
        overflow = not math.isfinite(square_sum)
        self.scaler.update(overflow)
        if overflow:
            return {"grad_norm": float("nan"), "skipped": True, "loss_scale": scale}
        grad_norm = math.sqrt(square_sum) / scale
        coef = optim.clip_coefficient(grad_norm, max_norm) / scale
        if coef != 1.0:
            for f in self.fragments:
                f.master.grad.mul_(coef)
        optim.set_lr(self.optimizer, lr)
        self.optimizer.step()
        self.refresh_params()
        return {"grad_norm": grad_norm, "skipped": False, "loss_scale": scale}

    def refresh_params(self) -> float:
        """Model parameters from the masters: cast where 16-bit, then the ZeRO all-gather."""
        with torch.no_grad():
            for bucket, master in self.shards:
                lo, hi = bucket.shard
                if master.data_ptr() != bucket.param[lo:hi].data_ptr():
                    bucket.param[lo:hi].copy_(master)
        return self.reducer.gather_params()

    def load_values(self, values: dict[int, torch.Tensor]) -> None:
        """Masters from whole local parameter values ({id(param): tensor}); then the params."""
        with torch.no_grad():
            for f in self.fragments:
                f.master.copy_(values[id(f.param)].reshape(-1)[f.start : f.stop])
        self.refresh_params()

    def state_of(self, fragment: Fragment) -> dict:
        """AdamW's state of one fragment (empty before the first step)."""
        return self.optimizer.state.get(fragment.master, {})

    def set_state(self, fragment: Fragment, state: dict) -> None:
        self.optimizer.state[fragment.master] = state

    def tensors(self) -> list[torch.Tensor]:
        """Masters held apart from the parameters, and AdamW's moments (memory accounting)."""
        out = [m for b, m in self.shards if m.data_ptr() != b.param[b.shard[0] :].data_ptr()]
        for state in self.optimizer.state.values():
            out += [v for k, v in state.items() if k != "step" and torch.is_tensor(v)]
        return out
