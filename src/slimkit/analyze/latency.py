"""Wall-clock latency: median of repeated runs after warm-up, with the thread count fixed.

Thread counts are set only inside :func:`torch_threads` and restored after,
so measuring never changes the caller's process settings.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from ..inputs import Inputs, call


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p25_ms: float
    p75_ms: float
    repeats: int
    p90_ms: float = float("nan")


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def time_call(fn: Callable[[], object], warmup: int = 3, min_repeats: int = 10, max_repeats: int = 200,
              budget_s: float = 0.5) -> Timing:
    """Run ``fn`` ``warmup`` times, then until ``budget_s`` is spent (within the repeat bounds)."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < max_repeats and (len(samples) < min_repeats or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(samples, n=4)
    return Timing(statistics.median(samples), q[0], q[2], len(samples), statistics.quantiles(samples, n=10)[8])


def torch_latency(model: nn.Module, x: Inputs, threads: int, **kw) -> Timing:
    model.eval()
    with torch_threads(threads), torch.inference_mode():
        return time_call(lambda: call(model, x), **kw)


def ort_latency(session, x: Inputs, **kw) -> Timing:
    from ..export.onnx import ort_feed

    feed = ort_feed(session, x)
    return time_call(lambda: session.run(None, feed), **kw)
