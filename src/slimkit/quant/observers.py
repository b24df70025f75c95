"""Observers choose the range [lo, hi] an activation is quantized over, from calibration batches.

* ``minmax``: the extremes seen.
* ``moving-minmax``: an exponential moving average of each batch's extremes.
* ``percentile``: the p-th and (100-p)-th percentiles (clips rare outliers).
* ``mse``: the clipping range that minimizes the quantization mean squared error.
* ``entropy``: the clipping range that minimizes the KL divergence between the value
  histogram and its quantized version (TensorRT's entropy calibration).

The last three keep a bounded, seeded sample of the values seen, so memory does not
grow with the calibration set.
"""

from __future__ import annotations

import math

import torch

from ..errors import SlimkitError
from .scheme import QScheme, fake_quantize, qparams

SAMPLE_LIMIT = 1 << 18
OBSERVERS = ("minmax", "moving-minmax", "percentile", "mse", "entropy")


class Observer:
    def __init__(self, scheme: QScheme | None = None, seed: int = 0):
        self.scheme = scheme or QScheme(bits=8, symmetric=False, signed=False)
        self.lo, self.hi = math.inf, -math.inf
        self._generator = torch.Generator().manual_seed(seed)
        self._sample: list[torch.Tensor] = []
        self._kept = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1)
        if x.numel() == 0:
            return
        lo, hi = (float(v) for v in torch.aminmax(x))  # one pass; a NaN anywhere makes both NaN
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise SlimkitError("calibration produced NaN or Inf activations")
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        self._observe(x)

    def _observe(self, x: torch.Tensor) -> None:
        """Keep a bounded random sample of the values (for the distribution-based observers)."""
        budget = SAMPLE_LIMIT // 8
        if x.numel() > budget:
            x = x[torch.randint(0, x.numel(), (budget,), generator=self._generator)]
        self._sample.append(x)
        self._kept += x.numel()
        if self._kept > SAMPLE_LIMIT:
            merged = torch.cat(self._sample)
            merged = merged[torch.randperm(merged.numel(), generator=self._generator)[: SAMPLE_LIMIT // 2]]
            self._sample, self._kept = [merged], merged.numel()

    def values(self) -> torch.Tensor:
        if not self._sample:
            raise SlimkitError("observer saw no data: run calibration batches first")
        return torch.cat(self._sample)

    def range(self) -> tuple[float, float]:
        if self.lo > self.hi:
            raise SlimkitError("observer saw no data: run calibration batches first")
        return self.lo, self.hi

    def qparams(self) -> tuple[float, int]:
        lo, hi = self.range()
        scale, zero = qparams(torch.tensor(lo), torch.tensor(hi), self.scheme)
        return float(scale), int(zero)


class MinMaxObserver(Observer):
    def _observe(self, x: torch.Tensor) -> None:
        pass


class MovingMinMaxObserver(Observer):
    def __init__(self, scheme: QScheme | None = None, seed: int = 0, momentum: float = 0.9):
        super().__init__(scheme, seed)
        self.momentum = momentum
        self._avg: tuple[float, float] | None = None

    def _observe(self, x: torch.Tensor) -> None:
        lo, hi = float(x.min()), float(x.max())
        if self._avg is None:
            self._avg = (lo, hi)
        else:
            m = self.momentum
            self._avg = (m * self._avg[0] + (1 - m) * lo, m * self._avg[1] + (1 - m) * hi)

    def range(self) -> tuple[float, float]:
        if self._avg is None:
            raise SlimkitError("observer saw no data: run calibration batches first")
        return self._avg


class PercentileObserver(Observer):
    def __init__(self, scheme: QScheme | None = None, seed: int = 0, percentile: float = 99.99):
        super().__init__(scheme, seed)
        if not 50 < percentile <= 100:
            raise SlimkitError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile

    def range(self) -> tuple[float, float]:
        v = self.values()
        q = torch.quantile(v[: 1 << 24].double(), torch.tensor([1 - self.percentile / 100, self.percentile / 100],
                                                                dtype=torch.float64))
        return float(q[0]), float(q[1])


class MSEObserver(Observer):
    """Coordinate descent over each end of the range, the error measured on a histogram of the values."""

    bins, steps, rounds = 2048, 100, 3

    def range(self) -> tuple[float, float]:
        v = self.values().double()
        if self.hi == self.lo:
            return self.lo, self.hi
        counts = torch.histc(v, bins=self.bins, min=self.lo, max=self.hi)
        width = (self.hi - self.lo) / self.bins
        centers = self.lo + width * (torch.arange(self.bins, dtype=torch.float64) + 0.5)

        def error(lo: float, hi: float) -> float:
            scale, zero = qparams(torch.tensor(lo), torch.tensor(hi), self.scheme)
            fq = fake_quantize(centers, scale.double(), zero, self.scheme.qmin, self.scheme.qmax)
            return float((counts * (fq - centers) ** 2).sum())

        lo, hi = self.lo, self.hi
        for _ in range(self.rounds):
            hi = min((self.hi * (1 - i / self.steps) for i in range(self.steps)), key=lambda h: error(lo, h))
            lo = min((self.lo * (1 - i / self.steps) for i in range(self.steps)), key=lambda l_: error(l_, hi))
        return lo, hi


class EntropyObserver(Observer):
    """Minimize KL(P || Q) between the histogram of values and its quantized, clipped version."""

    bins = 2048

    def range(self) -> tuple[float, float]:
        v = self.values().double()
        levels = self.scheme.qmax - self.scheme.qmin + 1
        top = max(abs(self.lo), abs(self.hi))
        if top == 0:
            return 0.0, 0.0
        signed = self.lo < 0
        hist = torch.histc(v.abs() if signed else v.clamp_min(0), bins=self.bins, min=0, max=top)
        target = levels // 2 if signed else levels
        best_i, best_kl = self.bins, math.inf
        for i in range(max(target, 16), self.bins + 1, 16):
            p = hist[:i].clone()
            p[-1] += hist[i:].sum()  # clipped mass piles onto the last bin
            q = _merge_and_expand(hist[:i], target)
            kl = _kl(p, q)
            if kl < best_kl:
                best_i, best_kl = i, kl
        edge = top * best_i / self.bins
        return (max(self.lo, -edge), min(self.hi, edge)) if signed else (0.0, edge)


def _merge_and_expand(p: torch.Tensor, levels: int) -> torch.Tensor:
    """Quantize a histogram to ``levels`` buckets and spread each bucket back over its non-empty bins."""
    chunks = torch.tensor_split(p, levels)
    out = []
    for chunk in chunks:
        nonzero = chunk > 0
        count = int(nonzero.sum())
        out.append(torch.where(nonzero, chunk.sum() / max(count, 1), torch.zeros_like(chunk)))
    return torch.cat(out)


def _kl(p: torch.Tensor, q: torch.Tensor) -> float:
    p = p / p.sum().clamp_min(1e-12)
    q = q / q.sum().clamp_min(1e-12)
    mask = p > 0
    q = q.clamp_min(1e-12)
    return float((p[mask] * torch.log(p[mask] / q[mask])).sum())


def make_observer(kind: str, scheme: QScheme | None = None, seed: int = 0) -> Observer:
    classes = {"minmax": MinMaxObserver, "moving-minmax": MovingMinMaxObserver, "percentile": PercentileObserver,
               "mse": MSEObserver, "entropy": EntropyObserver}
    if kind not in classes:
        raise SlimkitError(f"unknown observer {kind!r}; choose one of {', '.join(OBSERVERS)}")
    return classes[kind](scheme, seed)
