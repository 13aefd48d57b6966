"""Weight centralization / standardization against plain float64 recomputations."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from d2norm.layers.weight_transforms import (
    WeightCentralization,
    WeightStandardization,
    apply_weight_transform,
    bake_weight_transforms,
    centralize_weight,
    get_weight_transform,
    standardize_weight,
)


def _per_channel_reference(w, fn):
    """Apply fn(list of floats) -> list of floats to each output channel, in float64."""
    w64 = w.detach().to(torch.float64)
    out = torch.empty_like(w64)
    for o in range(w64.shape[0]):
        vals = [float(v) for v in w64[o].reshape(-1)]
        out[o] = torch.tensor(fn(vals), dtype=torch.float64).reshape(w64[o].shape)
    return out


def _center(vals):
    m = sum(vals) / len(vals)
    return [v - m for v in vals]


def _ws_sqrt_var(eps):
    def fn(vals):
        n = len(vals)
        m = sum(vals) / n
        var = sum((v - m) ** 2 for v in vals) / n  # biased
        return [(v - m) / (var + eps) ** 0.5 for v in vals]

    return fn


def _ws_std_plus_eps(eps):
    def fn(vals):
        n = len(vals)
        m = sum(vals) / n
        std = (sum((v - m) ** 2 for v in vals) / (n - 1)) ** 0.5  # unbiased
        return [(v - m) / (std + eps) for v in vals]

    return fn


@pytest.mark.parametrize("shape", [(4, 3, 3, 3), (6, 2, 1, 1), (5, 7)])
def test_centralize_matches_explicit_centering(shape):
    w = torch.randn(shape, dtype=torch.float64) + 0.7
    out = centralize_weight(w)
    torch.testing.assert_close(out, _per_channel_reference(w, _center), rtol=0, atol=1e-13)
    assert out.reshape(shape[0], -1).mean(1).abs().max() < 1e-13


@pytest.mark.parametrize("shape", [(4, 3, 3, 3), (6, 2, 1, 1)])
@pytest.mark.parametrize("eps", [1e-5, 1e-2])
def test_standardize_matches_float64(shape, eps):
    w = torch.randn(shape, dtype=torch.float64) * 0.05 + 0.01
    torch.testing.assert_close(
        standardize_weight(w, eps), _per_channel_reference(w, _ws_sqrt_var(eps)), rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(
        standardize_weight(w, eps, convention="std_plus_eps"),
        _per_channel_reference(w, _ws_std_plus_eps(eps)),
        rtol=1e-12,
        atol=1e-12,
    )
    # float32 input stays float32 and agrees with the float64 result
    w32 = w.float()
    out32 = standardize_weight(w32, eps)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(
        out32.double(), _per_channel_reference(w32, _ws_sqrt_var(eps)), rtol=1e-5, atol=1e-5
    )


def test_conventions_differ_and_bad_convention():
    w = torch.randn(4, 3, 3, 3) * 0.02
    assert not torch.allclose(standardize_weight(w), standardize_weight(w, convention="std_plus_eps"))
    with pytest.raises(ValueError, match="convention"):
        standardize_weight(w, convention="nope")
    with pytest.raises(ValueError, match="convention"):
        WeightStandardization(convention="nope")


@pytest.mark.parametrize(
    "transform,fn",
    [
        (WeightCentralization(), _center),
        (WeightStandardization(eps=1e-5), _ws_sqrt_var(1e-5)),
    ],
)
def test_parametrized_conv_matches_explicit(transform, fn):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1, bias=True).double()
    raw = conv.weight.detach().clone()
    apply_weight_transform(conv, transform)
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    w_hat = _per_channel_reference(raw, fn)
    torch.testing.assert_close(conv(x), F.conv2d(x, w_hat, conv.bias, padding=1), rtol=1e-10, atol=1e-10)
    # gradients reach the raw weight, which the optimizer updates
    conv(x).square().sum().backward()
    assert conv.parametrizations.weight.original.grad is not None
    assert "parametrizations.weight.original" in conv.state_dict()


def test_apply_is_idempotent_and_rejects_a_different_transform():
    conv = nn.Conv2d(3, 4, 3)
    apply_weight_transform(conv, WeightCentralization())
    apply_weight_transform(conv, WeightCentralization())
    assert len(conv.parametrizations["weight"]) == 1
    with pytest.raises(RuntimeError, match="WeightCentralization.*WeightStandardization"):
        apply_weight_transform(conv, WeightStandardization())
    ws = apply_weight_transform(nn.Conv2d(3, 4, 3), WeightStandardization(eps=1e-5))
    apply_weight_transform(ws, WeightStandardization(eps=1e-5))
    assert len(ws.parametrizations["weight"]) == 1
    with pytest.raises(RuntimeError, match="already has"):  # same kind, different settings
        apply_weight_transform(ws, WeightStandardization(eps=1e-3))
    with pytest.raises(TypeError):
        apply_weight_transform(nn.Conv2d(3, 4, 3), nn.Identity())


class _Scale(nn.Module):
    def forward(self, w):
        return 2 * w


def _model():
    torch.manual_seed(1)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.Conv2d(8, 4, 1),
    )
    apply_weight_transform(m[0], WeightCentralization())
    apply_weight_transform(m[2], WeightStandardization())
    parametrize.register_parametrization(m[4], "weight", _Scale())  # not ours: left alone
    return m


def test_bake_keeps_outputs_and_leaves_plain_parameters():
    m = _model()
    x = torch.randn(2, 3, 9, 9)
    before = m(x)
    bake_weight_transforms(m)
    torch.testing.assert_close(m(x), before, rtol=0, atol=0)
    for conv in (m[0], m[2]):
        assert type(conv) is nn.Conv2d and not parametrize.is_parametrized(conv)
        assert isinstance(conv.weight, nn.Parameter) and conv.weight.requires_grad
        assert get_weight_transform(conv) is None
    assert parametrize.is_parametrized(m[4], "weight")
    assert set(m[0].state_dict()) == {"weight"}
    bake_weight_transforms(m)  # nothing left to do: no error
    torch.testing.assert_close(m(x), before, rtol=0, atol=0)


def test_bake_then_state_dict_loads_into_plain_conv():
    m = _model()
    x = torch.randn(1, 3, 5, 5)
    bake_weight_transforms(m)
    plain = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    plain.load_state_dict(m[0].state_dict())
    torch.testing.assert_close(plain(x), m[0](x))


def test_parametrized_state_dict_round_trip():
    m = _model()
    m2 = copy.deepcopy(_model())
    with torch.no_grad():
        for p in m2.parameters():
            p.add_(1.0)
    m2.load_state_dict(m.state_dict())
    x = torch.randn(1, 3, 5, 5)
    torch.testing.assert_close(m2(x), m(x), rtol=0, atol=0)
