"""Per-layer F, B, W times on an accelerator from its operators: a roofline per operator.

A layer's forward runs once on meta tensors under a dispatch mode that records every operator:
GEMMs (mm, addmm, bmm, the attention kernels) with their FLOPs and the bytes they touch, and
every other operator as memory traffic (its inputs and outputs). Each operator takes
max(FLOPs / (peak x achieved fraction), bytes / HBM bandwidth): small or skinny GEMMs fall to
the memory roof by themselves, which is the shape dependence of the achieved fraction.

Backward, as the kernels do it: a weight GEMM (mm/addmm: an input times a weight) costs one
GEMM of the same FLOPs for the input gradient (B) and one for the weight gradient (W); the
attention kernels' backward costs 2.5x their forward (flash attention recomputes the scores:
dQ, dK, dV, dP and S); memory-bound operators move about twice their forward bytes, in B.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hpcpipe.models import api
from hpcpipe.plan.memory import layer_signatures
from hpcpipe.train.memory import _fake_mode, _materialize

_aten = torch.ops.aten
WEIGHT_GEMMS = {_aten.mm.default, _aten.addmm.default}
ACTIVATION_GEMMS = {_aten.bmm.default}
ATTENTION = {
    getattr(_aten, name).default
    for name in (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
    )
    if hasattr(_aten, name)
}
GATHERS = {_aten.embedding.default, _aten.index_select.default}
# Views and metadata cost nothing.
FREE = {
    "view",
    "_unsafe_view",
    "reshape",
    "expand",
    "t",
    "transpose",
    "permute",
    "unsqueeze",
    "squeeze",
    "slice",
    "select",
    "alias",
    "detach",
    "split",
    "split_with_sizes",
    "unbind",
    "as_strided",
    "empty",
    "zeros",
    "lift_fresh",
    "_to_copy",
    "clone",
    "arange",
    "full",
    "ones",
    "scalar_tensor",
    "device",
    "sym_size",
    "sym_stride",
    "sym_numel",
    "tril",
    "triu",
    "new_empty",
    "new_zeros",
    "lift_fresh_copy",
}

ATTENTION_BACKWARD = 2.5  # flash attention's backward FLOPs / forward FLOPs
ELEMENTWISE_BACKWARD = 2.0  # bytes moved in backward / forward for memory-bound operators


@dataclass(frozen=True)
class LayerOps:
    """One micro-batch of one layer, forward: FLOPs and bytes by operator class."""

    weight_gemms: tuple[tuple[float, float], ...]  # (flops, bytes) of each mm/addmm
    activation_gemms: tuple[tuple[float, float], ...]  # bmm and attention kernels
    other_bytes: float  # memory-bound operators' traffic

    @property
    def flops(self) -> float:
        """Forward FLOPs of every GEMM and attention matmul."""
        return sum(f for f, _ in self.weight_gemms + self.activation_gemms)


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _flat(args) -> list:
    out = []
    for a in args:
        if isinstance(a, (list, tuple)):
            out += _flat(a)
        else:
            out.append(a)
    return out


def _gemm(args, out) -> tuple[float, float]:
    """FLOPs and bytes of mm/addmm/bmm from the operands' shapes."""
    a, b = (args[1], args[2]) if len(args) > 2 and args[0].dim() <= 2 and args[1].dim() == 2 \
        else (args[0], args[1])  # fmt: skip
    k = a.shape[-1]
    flops = 2.0 * out.numel() * k
    return flops, float(_nbytes(a) + _nbytes(b) + _nbytes(out))


def _attention(args, outs) -> tuple[float, float]:
    """FLOPs of q @ k^T and att @ v over the full window (the MFU convention)."""
    q, k, v = args[0], args[1], args[2]
    batch_heads = math.prod(q.shape[:-2])
    flops = 2.0 * batch_heads * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1])
    return flops, float(_nbytes(q) + _nbytes(k) + _nbytes(v) + _nbytes(outs[0]))


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.weight, self.activation, self.other = [], [], 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = [o for o in _flat([out]) if isinstance(o, torch.Tensor)]
        if func in WEIGHT_GEMMS:
            self.weight.append(_gemm(args, outs[0]))
        elif func in ACTIVATION_GEMMS:
            self.activation.append(_gemm(args, outs[0]))
        elif func in ATTENTION:
            self.activation.append(_attention(args, outs))
        elif func in GATHERS:  # reads only the rows it returns, not the whole table
            self.other += 2 * sum(map(_nbytes, outs))
        elif func.__name__.split(".")[0] not in FREE:
            self.other += sum(map(_nbytes, _flat(args))) + sum(map(_nbytes, outs))
        return out


@functools.lru_cache(maxsize=512)
def _traced_ops(spec, model, index: int, batch: int, dtype_name: str) -> LayerOps:
    # FakeTensors of a real device, not meta: meta takes the math attention path (an s x s
    # softmax in memory) where devices run a fused kernel.
    dtype, device = getattr(torch, dtype_name), torch.device("cpu")
    with torch.device("meta"):
        layer = spec.build_layer(model, index)
    recorder = _Recorder()
    with _fake_mode(device), torch.no_grad():
        _materialize(layer, device, dtype)
        if index == 0:
            x = torch.zeros(batch, model.seq_len, dtype=torch.long)
        else:
            x = torch.zeros(tuple(spec.boundary_shape(model, batch)), dtype=dtype)
        target = torch.zeros(batch, model.seq_len, dtype=torch.long)
        with recorder:
            out = layer(x)
            if index == spec.num_layers(model) - 1:
                spec.loss(out, target)
    return LayerOps(tuple(recorder.weight), tuple(recorder.activation), recorder.other)


def _at(one: LayerOps, two: LayerOps, batch: int) -> LayerOps:
    """Every operator's FLOPs and bytes are affine in the batch: a + c * batch from 1 and 2."""

    def line(x1: float, x2: float) -> float:
        return x1 + (x2 - x1) * (batch - 1)

    def gemms(a, b):
        return tuple((line(f1, f2), line(b1, b2)) for (f1, b1), (f2, b2) in zip(a, b, strict=True))

    return LayerOps(
        gemms(one.weight_gemms, two.weight_gemms),
        gemms(one.activation_gemms, two.activation_gemms),
        line(one.other_bytes, two.other_bytes),
    )


def layer_ops(spec: api.ModelSpec, model, index: int, batch: int, dtype: torch.dtype) -> LayerOps:
    """The operators of one micro-batch of `batch` sequences through layer `index`: traced once
    per kind of layer (all blocks alike) at 1 and 2 sequences, affine in between and beyond."""
    name = str(dtype).removeprefix("torch.")
    index = layer_signatures(spec, model).index(layer_signatures(spec, model)[index])
    one, two = (_traced_ops(spec, model, index, b, name) for b in (1, 2))
    return one if batch == 1 else _at(one, two, batch)


@dataclass(frozen=True)
class Roof:
    """What one operator can reach on a device: peak FLOP/s and HBM bytes/s."""

    flops_per_s: float  # peak x the largest achieved fraction for GEMMs
    attention_flops_per_s: float  # peak x the achieved fraction of fused attention kernels
    bytes_per_s: float

    def gemm(self, flops: float, nbytes: float, attention: bool = False) -> float:
        rate = self.attention_flops_per_s if attention else self.flops_per_s
        return max(flops / rate, nbytes / self.bytes_per_s)


def layer_times(ops: LayerOps, roof: Roof, tp: int = 1) -> tuple[float, float, float]:
    """(F, B, W) seconds of one micro-batch; GEMM work and traffic split tp ways (Megatron
    shards every GEMM of a block and the head), memory-bound operators not (norms, residual
    adds and the loss run on the whole activation on every tp rank)."""
    weight = [roof.gemm(f / tp, b / tp) for f, b in ops.weight_gemms]
    attention = [roof.gemm(f / tp, b / tp, attention=True) for f, b in ops.activation_gemms]
    other = ops.other_bytes / roof.bytes_per_s
    forward = sum(weight) + sum(attention) + other
    backward_input = (
        sum(weight) + ATTENTION_BACKWARD * sum(attention) + ELEMENTWISE_BACKWARD * other
    )
    return forward, backward_input, sum(weight)


def attention_time(ops: LayerOps, roof: Roof, tp: int = 1) -> float:
    """Forward seconds of the attention kernels alone (what selective recomputation redoes)."""
    return sum(roof.gemm(f / tp, b / tp, attention=True) for f, b in ops.activation_gemms)
