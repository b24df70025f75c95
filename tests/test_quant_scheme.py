import math

import pytest
import torch

from slimkit import SlimkitError
from slimkit.quant import (
    QScheme, cast_roundtrip, fake_quantize_tensor, log2_quantize, make_observer, qparams, quantize_tensor,
)

G = torch.Generator().manual_seed(0)
X = torch.randn(16, 64, generator=G, dtype=torch.float64).float() * 3


def reference(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool, signed: bool):
    """float64 reference of scale, zero point and x_hat (ONNX QuantizeLinear semantics)."""
    x, lo, hi = x.double(), torch.minimum(lo.double(), torch.zeros(())), torch.maximum(hi.double(), torch.zeros(()))
    qmin = (-(2 ** (bits - 1)) + (1 if symmetric else 0)) if signed else 0
    qmax = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    if symmetric:
        scale = torch.maximum(-lo, hi) / qmax
        zero = torch.zeros_like(scale) if signed else torch.full_like(scale, (qmax + 1) // 2)
    else:
        scale = (hi - lo) / (qmax - qmin)
        zero = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    q = torch.clamp(torch.round(x / scale) + zero, qmin, qmax)
    return scale, zero, (q - zero) * scale


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8, 16])
@pytest.mark.parametrize("symmetric, signed", [(True, True), (False, False), (False, True)])
def test_per_tensor_matches_float64_and_errs_at_most_half_a_step(bits, symmetric, signed):
    scheme = QScheme(bits=bits, symmetric=symmetric, signed=signed)
    scale, zero, ref = reference(X, X.min(), X.max(), bits, symmetric, signed)
    got = fake_quantize_tensor(X, scheme)
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-6 * float(scale))
    assert float((got.double() - X.double()).abs().max()) <= float(scale) / 2 * (1 + 1e-5)


def test_per_channel_and_per_group_use_their_own_ranges():
    codes, scale, zero = quantize_tensor(X, QScheme(granularity="channel", axis=0))
    assert scale.shape == (16,) and (zero == 0).all()
    torch.testing.assert_close(scale.double(), X.abs().amax(1).double() / 127, rtol=1e-6, atol=0)
    assert codes.abs().amax(1).eq(127).all()  # every channel uses its full range
    w = torch.randn(4, 8, 3, 3, generator=G)
    _, s, _ = quantize_tensor(w, QScheme(granularity="channel", axis=1))
    torch.testing.assert_close(s, w.abs().amax((0, 2, 3)) / 127)
    codes, scale, _ = quantize_tensor(X, QScheme(bits=4, granularity="group", group_size=16))
    assert scale.shape == (16 * 4,) and codes.shape == X.shape
    torch.testing.assert_close(scale, X.reshape(-1, 16).abs().amax(1) / 7)
    with pytest.raises(SlimkitError, match="not a multiple of group_size"):
        quantize_tensor(X, QScheme(granularity="group", group_size=48))


def test_clipping_and_exact_zero():
    scheme = QScheme(bits=8, symmetric=False, signed=False)
    scale, zero = qparams(torch.tensor(-1.0), torch.tensor(1.0), scheme)
    from slimkit.quant import fake_quantize

    x = torch.tensor([-5.0, -1.0, 0.0, 0.5, 7.0])
    y = fake_quantize(x, scale, zero, scheme.qmin, scheme.qmax)
    assert y[2] == 0.0  # zero is representable exactly
    assert y[0] == (scheme.qmin - zero) * scale  # clipped to the lowest level
    assert y[4] == (scheme.qmax - zero) * scale  # and to the highest
    assert abs(float(y[1]) + 1) <= float(scale)
    sparse = X.clone()
    sparse[sparse.abs() < 2] = 0
    assert (fake_quantize_tensor(sparse, QScheme(bits=4))[sparse == 0] == 0).all()


def test_range_that_excludes_zero_is_widened():
    scale, zero = qparams(torch.tensor(2.0), torch.tensor(4.0), QScheme(symmetric=False, signed=False))
    assert int(zero) == 0 and float(scale) == pytest.approx(4 / 255)


@pytest.mark.parametrize("bits", [3, 4, 5])
def test_log2_levels_are_signed_powers_of_two(bits):
    y = log2_quantize(X, bits)
    nonzero = y[y != 0]
    exponents = torch.log2(nonzero.abs())
    assert torch.equal(exponents, torch.round(exponents))
    assert len(torch.unique(exponents)) <= 2 ** (bits - 1) - 1
    assert (torch.sign(nonzero) == torch.sign(X[y != 0])).all()
    assert log2_quantize(torch.tensor([3.0, -0.7, 0.0]), 4, max_exponent=2).tolist() == [4.0, -0.5, 0.0]


def test_fp16_bf16_roundtrip_error_and_overflow():
    for dtype, eps in (("fp16", 2**-11), ("bf16", 2**-8)):
        y = cast_roundtrip(X, dtype)
        assert float(((y - X).abs() / X.abs().clamp_min(1e-3)).max()) <= eps
    with pytest.raises(SlimkitError, match="overflow fp16"):
        cast_roundtrip(torch.tensor([1e6]), "fp16")


def test_observers():
    torch.manual_seed(0)
    batches = [torch.randn(20000, generator=G) for _ in range(4)]
    batches[2][0] = 40.0  # one outlier
    observers = {k: make_observer(k) for k in ("minmax", "moving-minmax", "percentile", "mse", "entropy")}
    for obs in observers.values():
        for b in batches:
            obs.update(b)
    lo, hi = observers["minmax"].range()
    assert (lo, hi) == (float(torch.cat(batches).min()), 40.0)
    expected_hi = float(batches[0].max())
    for b in batches[1:]:
        expected_hi = 0.9 * expected_hi + 0.1 * float(b.max())
    assert observers["moving-minmax"].range()[1] == pytest.approx(expected_hi)
    for kind in ("percentile", "entropy"):
        k_lo, k_hi = observers[kind].range()
        assert lo <= k_lo and k_hi < 20, kind  # the outlier is clipped away
    m_lo, m_hi = observers["mse"].range()  # at 8 bits the outlier's clipping error outweighs rounding noise
    assert lo <= m_lo and m_hi <= 40.0
    scale, zero = observers["minmax"].qparams()
    assert scale == pytest.approx((40.0 - lo) / 255) and 0 <= zero <= 255
    with pytest.raises(SlimkitError, match="saw no data"):
        make_observer("mse").range()
    with pytest.raises(SlimkitError, match="unknown observer"):
        make_observer("magic")
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(SlimkitError, match="NaN or Inf activations"):
            make_observer("minmax").update(torch.tensor([0.0, bad, 1.0]))


def test_mse_observer_beats_minmax_on_its_objective():
    values = torch.cat([torch.randn(20000, generator=G), torch.tensor([25.0])])
    from slimkit.quant import fake_quantize

    errors = {}
    scheme = QScheme(bits=4, symmetric=False, signed=False)
    for kind in ("minmax", "mse"):
        obs = make_observer(kind, scheme)
        obs.update(values)
        scale, zero = obs.qparams()
        errors[kind] = float((fake_quantize(values, scale, zero, 0, 15) - values).pow(2).mean())
    assert errors["mse"] < 0.5 * errors["minmax"]
    assert math.isfinite(errors["mse"])
