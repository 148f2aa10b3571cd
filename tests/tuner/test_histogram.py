import numpy as np
import pytest
import torch

from tuner.errors import InvalidArgumentError
from tuner.histogram import METHODS, TensorStats
from tuner.quant import UINT8, compute_qparams, fake_quantize


def heavy_tail(n=200_000, outliers=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    x[:outliers] = 60.0  # 0.015% of the values, far out
    return x


def stats_of(*tensors, max_bins=4096):
    s = TensorStats(max_bins)
    for t in tensors:
        s.update(t)
    return s


def test_histogram_is_exact_and_bounded_across_range_growth():
    parts = [torch.randn(1000) * scale for scale in (0.01, 1.0, 100.0, 1e4)]
    s = stats_of(*parts, max_bins=512)
    assert len(s.counts) <= 512
    assert s.counts.sum() == 4000 == s.count
    edges = s.edges()
    expected, _ = np.histogram(torch.cat(parts).numpy(), bins=edges)
    assert np.array_equal(expected, s.counts)  # merging bins never mis-assigns a value
    assert s.min == torch.cat(parts).min().item() and s.max == torch.cat(parts).max().item()


def test_max_keeps_the_tail_percentile_and_entropy_clip_it():
    s = stats_of(heavy_tail())
    assert s.range("max", True)[1] == 60.0
    for method in ("percentile-99.9", "entropy"):
        lo, hi = s.range(method, True)
        assert hi < 10.0, method
        assert hi > 2.5, method  # but keeps the body of the distribution
    # 99.999 keeps values more frequent than 1e-5: the 30/200000 outliers survive it
    assert s.range("percentile-99.999", True)[1] == pytest.approx(60.0, rel=0.01)


def test_percentile_matches_numpy_on_both_tails():
    x = torch.randn(100_000) * 3 + 1
    s = stats_of(x)
    lo, hi = s.range("percentile-99.9", False)
    assert lo == pytest.approx(np.percentile(x.numpy(), 0.1), abs=0.02)
    assert hi == pytest.approx(np.percentile(x.numpy(), 99.9), abs=0.02)


def _mse(x, lo, hi):
    qp = compute_qparams(lo, hi, symmetric=False, qtype=UINT8)
    return torch.mean((fake_quantize(x, qp) - x) ** 2).item()


@pytest.mark.parametrize("data", ["heavy_tail", "relu", "uniform"])
def test_mse_range_is_no_worse_than_a_brute_force_scan(data):
    x = {"heavy_tail": heavy_tail(50_000, 20), "relu": torch.relu(torch.randn(50_000)) ** 2,
         "uniform": torch.rand(50_000) * 4 - 1}[data]
    s = stats_of(x)
    lo, hi = s.range("mse", False)
    ours = _mse(x, lo, hi)
    brute = min(_mse(x, a * x.min().item(), a * x.max().item()) for a in np.linspace(0.02, 1.0, 200))
    assert ours <= brute * 1.05


def test_entropy_ignores_the_relu_spike_at_zero():
    x = torch.relu(torch.randn(100_000))
    lo, hi = stats_of(x).range("entropy", False)
    assert lo == 0.0
    assert 2.5 < hi <= x.max().item()  # not dragged to the first bins by the zeros


def test_every_method_gives_a_range_inside_the_data_and_symmetric_is_symmetric():
    s = stats_of(heavy_tail(20_000, 5) - 0.5)
    for method in METHODS:
        lo, hi = s.range(method, False)
        assert s.min <= lo <= hi <= s.max, method
        slo, shi = s.range(method, True)
        assert slo == -shi, method


def test_unknown_method_is_rejected():
    with pytest.raises(InvalidArgumentError, match="calibration method"):
        stats_of(torch.randn(10)).range("kl", True)
