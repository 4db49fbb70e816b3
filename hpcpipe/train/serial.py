"""Single-process training of the whole model: the correctness oracle and the benchmark baseline.

It shares no code with the pipeline runtime: one model, plain autograd, torch's own clipping.
"""

from __future__ import annotations

import copy

import torch

from hpcpipe import data
from hpcpipe.config import HALF, TORCH_DTYPES, Config
from hpcpipe.models import get_spec
from hpcpipe.models.api import build_model
from hpcpipe.train import evaluate as evaluation
from hpcpipe.train import optim


class SerialTrainer:
    """The same model, data, seed and optimizer as the pipeline, in one process."""

    def __init__(self, config: Config, tokens=None):
        self.config = config
        dtype = TORCH_DTYPES[config.train.dtype]
        self.spec = get_spec(config.model.arch)
        # 16-bit: `model` holds the float32 masters the optimizer updates; `compute` is their
        # 16-bit copy that runs forward and backward (re-derived after every step).
        master = torch.float32 if dtype in HALF else dtype
        self.model = build_model(self.spec, config.model, config.train.seed).to(dtype=master)
        self.compute = copy.deepcopy(self.model).to(dtype=dtype) if master != dtype else self.model
        # PipeDream-2BW: forward and backward of step t run on the weights before the last
        # update, W(t-1) (W(-1) = W(0)); the update still applies to W(t).
        self.stale = config.schedule.name == "2bw"
        if self.stale:
            self.compute = copy.deepcopy(self.compute)
        self.optimizer = optim.make_adamw(self.model.named_parameters(), config.train)
        if tokens is None:
            tokens = data.load_tokens(config.data.path or None, max_bytes=config.data.max_bytes)
        self.tokens = tokens
        self.sampler = evaluation.training_sampler(config, tokens)
        self.validation: evaluation.ValidationSet | None = None
        self.step_index = 0

    def forward_backward(self) -> float:
        """Accumulate the gradients of M micro-batches; return the mean loss."""
        M = self.config.schedule.microbatches
        starts = self.sampler.next_starts()
        inputs, targets = data.make_batch(self.tokens, starts, self.config.model.seq_len)
        self.model.zero_grad(set_to_none=True)
        total = 0.0
        for x, y in data.split_microbatches(inputs, targets, M):
            loss = self.spec.loss(self.compute(x), y) / M
            loss.backward()
            total += float(loss.detach().double())
            self._accumulate_in_master()
        return total

    def evaluate(self) -> float:
        """The oracle's validation loss: a plain forward over the same held-out micro-batches,
        the mean of their losses."""
        if self.validation is None:
            self.validation = evaluation.validation_set(self.config, self.tokens)
        batches = evaluation.microbatches(self.validation, self.config, dp_rank=0, dp=1)
        total = torch.zeros((), dtype=torch.float64)
        model = self.compute
        if self.stale:  # the newest weights are evaluated, not the stale ones being trained
            model = copy.deepcopy(self.model).to(dtype=next(self.compute.parameters()).dtype)
        model.train(False)
        try:
            with torch.no_grad():
                for x, y in batches:
                    total += self.spec.loss(model(x), y).double()
        finally:
            model.train(True)
        return float(total / len(batches))

    def _accumulate_in_master(self) -> None:
        """Add this micro-batch's gradients into the model's (16-bit: into the float32
        masters, in float32; 2BW: from the stale copy)."""
        if self.compute is self.model:
            return
        for p, q in zip(self.model.parameters(), self.compute.parameters(), strict=True):
            if q.grad is not None:
                grad = q.grad.to(p.dtype)
                p.grad = grad.clone() if p.grad is None else p.grad.add_(grad)
                q.grad = None

    def finish_step(self) -> float:
        """Clip, set LR, AdamW step; return the pre-clip gradient norm."""
        t = self.config.train
        max_norm = t.grad_clip if t.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        optim.set_lr(self.optimizer, optim.lr_at(self.step_index, t))
        before = [p.detach().clone() for p in self.model.parameters()] if self.stale else None
        self.optimizer.step()
        self.step_index += 1
        if self.stale:  # the next step computes on the weights this update started from
            with torch.no_grad():
                for value, q in zip(before, self.compute.parameters(), strict=True):
                    q.copy_(value)
        elif self.compute is not self.model:
            with torch.no_grad():
                for p, q in zip(self.model.parameters(), self.compute.parameters(), strict=True):
                    q.copy_(p)
        return float(norm)

    def grads(self) -> dict[str, torch.Tensor]:
        """Current gradient of every parameter, by global name."""
        named = self.model.named_parameters(remove_duplicate=False)  # tied names too
        return {n: p.grad.detach().clone() for n, p in named}

    def params(self) -> dict[str, torch.Tensor]:
        """Current value of every parameter, by global name."""
        named = self.model.named_parameters(remove_duplicate=False)
        return {n: p.detach().clone() for n, p in named}
