"""Streaming statistics of one tensor, and every calibration method's range derived from them.

A `TensorStats` keeps the exact min/max and a histogram whose bins are aligned to 0 with a
power-of-two width. When new data falls outside, the width doubles and neighbouring bins merge
exactly, so the histogram is exact at its resolution, never holds more than `max_bins` bins, and
never needs the data again: max, percentile, entropy (KL) and MSE ranges all come from it.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .errors import InvalidArgumentError

PERCENTILES = (99.9, 99.99, 99.999)
METHODS = ("max", *(f"percentile-{p:g}" for p in PERCENTILES), "entropy", "mse")


def check_method(method: str) -> str:
    if method not in METHODS:
        raise InvalidArgumentError(f"calibration method must be one of {list(METHODS)}, but got {method!r}.")
    return method


class TensorStats:
    """Min, max and a bounded, 0-aligned histogram of every value seen by `update`."""

    def __init__(self, max_bins: int = 4096):
        if max_bins < 256 or max_bins % 2:
            raise InvalidArgumentError(f"`max_bins` must be an even number >= 256, but got {max_bins=}.")
        self.max_bins = max_bins
        self.min = math.inf
        self.max = -math.inf
        self.count = 0
        self.zeros = 0  # exact zeros (e.g. after ReLU): representable without error in every range
        self.width = 0.0  # bin k covers [k * width, (k + 1) * width)
        self.first_bin = 0
        self.counts = np.zeros(0, dtype=np.float64)
        self._ranges: dict[tuple[str, bool], tuple[float, float]] = {}  # derived ranges, until the next update

    # -- gathering ---------------------------------------------------------------------------

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1).float()
        x = x[torch.isfinite(x)]
        if x.numel() == 0:
            return
        self._ranges.clear()
        lo, hi = x.min().item(), x.max().item()
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        self.count += x.numel()
        self.zeros += int((x == 0).sum())
        if self.width == 0.0:
            span = max(hi - lo, abs(lo), abs(hi), 1e-12)
            self.width = 2.0 ** math.ceil(math.log2(span / (self.max_bins // 2)))
            self.first_bin = math.floor(lo / self.width)
        self._cover(math.floor(lo / self.width), math.floor(hi / self.width))
        idx = torch.floor(x / self.width).long() - self.first_bin
        self.counts += torch.bincount(idx, minlength=len(self.counts)).double().numpy()

    def _cover(self, kmin: int, kmax: int) -> None:
        """Grow the bin array to hold bins kmin..kmax, doubling the width while it is too long."""
        start = min(kmin, self.first_bin)
        end = max(kmax + 1, self.first_bin + len(self.counts))
        while end - start > self.max_bins:
            self._double_width()
            kmin, kmax = kmin // 2, kmax // 2
            start = min(kmin, self.first_bin)
            end = max(kmax + 1, self.first_bin + len(self.counts))
        grown = np.zeros(end - start)
        offset = self.first_bin - start
        grown[offset : offset + len(self.counts)] = self.counts
        self.counts, self.first_bin = grown, start

    def _double_width(self) -> None:
        # bins 2j and 2j+1 merge into bin j; floor division keeps the 0 alignment exact
        if self.first_bin % 2:
            self.counts = np.concatenate([[0.0], self.counts])
            self.first_bin -= 1
        if len(self.counts) % 2:
            self.counts = np.concatenate([self.counts, [0.0]])
        self.counts = self.counts.reshape(-1, 2).sum(1)
        self.first_bin //= 2
        self.width *= 2.0

    # -- derived distributions ---------------------------------------------------------------

    @property
    def empty(self) -> bool:
        return self.count == 0

    def edges(self) -> np.ndarray:
        return (self.first_bin + np.arange(len(self.counts) + 1)) * self.width

    def folded(self) -> np.ndarray:
        """Histogram of |x| on bins [j*w, (j+1)*w): x in bin k<0 has |x| in bin -k-1."""
        n = max(self.first_bin + len(self.counts), -self.first_bin, 1)
        out = np.zeros(n)
        ks = self.first_bin + np.arange(len(self.counts))
        np.add.at(out, np.where(ks >= 0, ks, -ks - 1), self.counts)
        return out

    # -- ranges ------------------------------------------------------------------------------

    def range(self, method: str, symmetric: bool) -> tuple[float, float]:
        """The float range [lo, hi] that `method` selects for this tensor."""
        check_method(method)
        if self.empty:
            return 0.0, 0.0
        key = (method, symmetric)
        if key not in self._ranges:
            self._ranges[key] = self._compute_range(method, symmetric)
        return self._ranges[key]

    def _compute_range(self, method: str, symmetric: bool) -> tuple[float, float]:
        if method == "max":
            lo, hi = self.min, self.max
        elif method.startswith("percentile-"):
            lo, hi = self._percentile_range(float(method.split("-", 1)[1]), symmetric)
        elif method == "entropy":
            lo, hi = self._entropy_range(symmetric)
        else:
            lo, hi = self._mse_range(symmetric)
        lo, hi = float(lo), float(hi)
        if symmetric:
            amax = max(abs(lo), abs(hi))
            return -amax, amax
        return lo, hi

    def _quantile(self, counts: np.ndarray, origin: float, q: float) -> float:
        """Value below which a fraction q of the histogram's mass lies (linear inside a bin)."""
        cdf = np.cumsum(counts)
        target = q * cdf[-1]
        k = int(np.searchsorted(cdf, target, side="left"))
        k = min(k, len(counts) - 1)
        below = cdf[k - 1] if k else 0.0
        frac = (target - below) / counts[k] if counts[k] else 1.0
        return origin + (k + frac) * self.width

    def _percentile_range(self, p: float, symmetric: bool) -> tuple[float, float]:
        if symmetric:
            t = min(self._quantile(self.folded(), 0.0, p / 100.0), max(-self.min, self.max))
            return -t, t
        origin = self.first_bin * self.width
        lo = max(self._quantile(self.counts, origin, 1.0 - p / 100.0), self.min)
        hi = min(self._quantile(self.counts, origin, p / 100.0), self.max)
        return min(lo, 0.0) if self.min < 0 else self.min, hi if self.max > 0 else self.max

    def _entropy_range(self, symmetric: bool) -> tuple[float, float]:
        # exact zeros are left out: 0 is exact in every range, and the spike a ReLU leaves at 0
        # would otherwise dominate the divergence and pull the threshold far into the data
        hist = self.folded()
        hist[0] -= self.zeros
        one_sided = not symmetric and (self.min >= 0 or self.max <= 0)
        t = _kl_threshold(hist, 255 if one_sided else 127) * self.width  # UINT8 uses all 256 levels
        if one_sided and self.min >= 0:
            return self.min, min(t, self.max)
        if one_sided:
            return max(-t, self.min), self.max
        return max(-t, self.min), min(t, self.max)

    def _mse_range(self, symmetric: bool, steps: int = 128) -> tuple[float, float]:
        """Shrink the observed range by a factor in (0, 1] minimising the expected qdq error."""
        centers = (self.edges()[:-1] + self.edges()[1:]) / 2
        lo0, hi0 = min(self.min, 0.0), max(self.max, 0.0)
        if symmetric:
            lo0, hi0 = -max(-lo0, hi0), max(-lo0, hi0)
        alphas = np.linspace(1.0 / steps, 1.0, steps)[:, None]
        lo, hi = alphas * lo0, alphas * hi0
        if symmetric:
            scale, zero, qmin, qmax = hi / 127.0, 0.0, -127, 127
        else:
            scale = (hi - lo) / 255.0
            zero = np.clip(np.round(-lo / np.where(scale > 0, scale, 1.0)), 0, 255)
            qmin, qmax = 0, 255
        scale = np.where(scale > 0, scale, 1.0)
        q = np.clip(np.round(centers[None, :] / scale) + zero, qmin, qmax)
        err = ((scale * (q - zero) - centers[None, :]) ** 2 * self.counts[None, :]).sum(1)
        best = int(np.argmin(err))
        return float(lo[best, 0]), float(hi[best, 0])


def _kl_threshold(hist: np.ndarray, levels: int, max_candidates: int = 256) -> int:
    """TensorRT-style entropy calibration on a one-sided histogram: the bin count i minimising
    KL(P || Q), P the histogram clipped at i (outliers folded into the last bin), Q that
    histogram quantized to `levels` levels. Returns i (threshold = i * bin width)."""
    nz = np.nonzero(hist)[0]
    n = int(nz[-1]) + 1 if len(nz) else 1
    if n <= levels:
        return n
    hist = hist[:n]
    candidates = np.unique(np.linspace(levels, n, min(max_candidates, n - levels + 1)).astype(int))
    best_i, best_kl = n, math.inf
    for i in candidates:
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()
        # split the i bins into `levels` chunks; each chunk's mass spreads over its non-empty bins
        bounds = np.linspace(0, i, levels + 1).astype(int)
        starts = bounds[:-1][np.diff(bounds) > 0]
        chunk_mass = np.add.reduceat(hist[:i], starts)
        chunk_nonzero = np.add.reduceat((hist[:i] > 0).astype(np.float64), starts)
        chunk_of_bin = np.repeat(np.arange(len(starts)), np.diff(np.append(starts, i)))
        per_bin = np.where(chunk_nonzero > 0, chunk_mass / np.maximum(chunk_nonzero, 1), 0.0)
        q = np.where(hist[:i] > 0, per_bin[chunk_of_bin], 0.0)
        ps, qs = p.sum(), q.sum()
        if ps == 0 or qs == 0:
            continue
        p, q = p / ps, q / qs
        mask = p > 0
        # bins where P > 0 but Q = 0 (only the folded outlier bin) get a tiny Q
        kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
        if kl < best_kl:
            best_i, best_kl = int(i), kl
    return best_i
