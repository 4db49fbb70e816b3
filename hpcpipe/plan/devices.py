"""Known accelerators: dense peak TFLOP/s per dtype, memory, and the links between them.

The numbers are the vendors' datasheet figures (dense, i.e. without 2:4 sparsity):
- A100: NVIDIA A100 Tensor Core GPU datasheet (SXM4 80GB): FP64 Tensor Core 19.5, TF32 156,
  BF16/FP16 312 TFLOP/s; 80 GB HBM2e at 2,039 GB/s; NVLink 600 GB/s (both directions).
- H100: NVIDIA H100 Tensor Core GPU datasheet (SXM5): FP64 Tensor Core 67, FP32 67, TF32 494,
  BF16/FP16 989 TFLOP/s; 80 GB HBM3 at 3.35 TB/s; NVLink 900 GB/s (both directions).
- H200: NVIDIA H200 Tensor Core GPU datasheet (SXM): H100 SXM's compute; 141 GB HBM3e at
  4.8 TB/s; NVLink 900 GB/s.
Inter-node links are one InfiniBand NIC per GPU, as on DGX A100 (HDR, 200 Gb/s) and DGX
H100/H200 (NDR, 400 Gb/s). Latencies are typical one-way small-message figures.
The dtype keys are train.dtype's names (hpcpipe.config.DTYPES), plus "tf32" for the planner.
float32 training maps to the plain FP32 peak: torch keeps TF32 matmuls off by default.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Device:
    """One accelerator and the links a cluster of them uses (bytes, seconds, per direction)."""

    name: str
    peak_tflops: dict[str, float]  # dtype name -> dense peak TFLOP/s
    memory_bytes: float
    hbm_bytes_per_s: float
    intra_node_bytes_per_s: float  # NVLink, per GPU per direction
    intra_node_latency_s: float
    inter_node_bytes_per_s: float  # InfiniBand, per GPU per direction
    inter_node_latency_s: float


NVLINK_LATENCY_S = 3e-6
INFINIBAND_LATENCY_S = 5e-6

_HOPPER_PEAKS = {"float64": 67.0, "float32": 67.0, "tf32": 494.0, "bfloat16": 989.0,
                 "float16": 989.0}  # fmt: skip

DEVICES: dict[str, Device] = {
    d.name: d
    for d in (
        Device(
            name="a100-80g",
            peak_tflops={
                "float64": 19.5,
                "float32": 19.5,
                "tf32": 156.0,
                "bfloat16": 312.0,
                "float16": 312.0,
            },  # fmt: skip
            memory_bytes=80e9,
            hbm_bytes_per_s=2.039e12,
            intra_node_bytes_per_s=300e9,
            intra_node_latency_s=NVLINK_LATENCY_S,
            inter_node_bytes_per_s=25e9,  # HDR 200 Gb/s
            inter_node_latency_s=INFINIBAND_LATENCY_S,
        ),
        Device(
            name="h100-80g",
            peak_tflops=dict(_HOPPER_PEAKS),
            memory_bytes=80e9,
            hbm_bytes_per_s=3.35e12,
            intra_node_bytes_per_s=450e9,
            intra_node_latency_s=NVLINK_LATENCY_S,
            inter_node_bytes_per_s=50e9,  # NDR 400 Gb/s
            inter_node_latency_s=INFINIBAND_LATENCY_S,
        ),
        Device(
            name="h200",
            peak_tflops=dict(_HOPPER_PEAKS),
            memory_bytes=141e9,
            hbm_bytes_per_s=4.8e12,
            intra_node_bytes_per_s=450e9,
            intra_node_latency_s=NVLINK_LATENCY_S,
            inter_node_bytes_per_s=50e9,  # NDR 400 Gb/s
            inter_node_latency_s=INFINIBAND_LATENCY_S,
        ),
    )
}

# torch.cuda.get_device_name -> table entry. Only names whose peak is the entry's: every A100
# (SXM4 and PCIe, 40 and 80 GB) has the same tensor cores, but an H100 PCIe or NVL, or an
# H200 NVL, runs at lower clocks and is left unknown rather than credited SXM's peak.
_CUDA_NAMES = (
    (re.compile(r"\bA100\b"), "a100-80g"),
    (re.compile(r"\bH100\b.*\b(HBM3|SXM)"), "h100-80g"),
    (re.compile(r"\bH200\b(?!.*\bNVL\b)"), "h200"),
)


def device_by_name(name: str) -> Device:
    """The table's entry for `name` (e.g. "h100-80g")."""
    try:
        return DEVICES[name]
    except KeyError:
        raise ValueError(f"unknown device {name!r}; known devices: {', '.join(DEVICES)}") from None


def device_for_cuda_name(cuda_name: str) -> Device | None:
    """The entry whose peak a GPU reporting `cuda_name` has, or None when none is known."""
    for pattern, name in _CUDA_NAMES:
        if pattern.search(cuda_name):
            return DEVICES[name]
    return None


def known_peak_tflops(device: torch.device | str, dtype: str) -> float | None:
    """Dense peak TFLOP/s of `device` in `dtype` (a train.dtype name); None on CPU or unknown."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    known = device_for_cuda_name(torch.cuda.get_device_name(device))
    return None if known is None else known.peak_tflops.get(dtype)
