"""Measure models: parameters, MACs, bytes on disk, accuracy, latency."""

from .latency import Timing, time_call, torch_threads
from .profile import LayerStats, count_macs, count_params, layer_stats, measure_latency, profile

__all__ = [
    "LayerStats", "Timing", "count_macs", "count_params", "layer_stats", "measure_latency", "profile",
    "time_call", "torch_threads",
]
