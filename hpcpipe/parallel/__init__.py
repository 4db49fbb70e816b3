"""Parallelism that knows no model: grid, p2p, tensor and data parallelism, tied groups, ULFM."""
