"""The old 16-bit training, kept only as a reference for tests and benchmarks.

Before mixed precision, `train.dtype = "bfloat16"` stored the parameters, gradients and AdamW
moments in bfloat16: updates below bfloat16's resolution (about 0.4 % of a weight) were lost.
hpcpipe no longer trains that way; this helper shows what the fp32 masters buy.
"""

from __future__ import annotations

import dataclasses

import torch

from hpcpipe.train import optim
from hpcpipe.train.serial import SerialTrainer


class PureHalfTrainer(SerialTrainer):
    """Single-process training with everything (weights, grads, AdamW state) in `dtype`."""

    def __init__(self, config, tokens=None, dtype=torch.bfloat16):
        fp32 = dataclasses.replace(config, train=dataclasses.replace(config.train, dtype="float32"))
        super().__init__(fp32, tokens)
        self.model = self.model.to(dtype=dtype)
        self.compute = self.model
        self.optimizer = optim.make_adamw(self.model.named_parameters(), config.train)
