"""The weight transforms' analytic backward and the rebuilt-in-backward W_hat: gradients equal
torch autograd through the explicit formulas (float64), and a prepared conv keeps no W_hat
between forward and backward."""

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from d2norm.layers.weight_transforms import (
    WeightCentralization,
    WeightStandardization,
    apply_weight_transform,
    centralize_weight,
    release_transformed_weight,
    standardize_weight,
)


def _explicit(w, kind, eps):
    """The transforms written out with differentiable torch ops (autograd gives the reference)."""
    dims = tuple(range(1, w.dim()))
    mean = w.mean(dims, keepdim=True)
    if kind == "centralization":
        return w - mean
    d = w - mean
    if kind == "sqrt_var":
        return d / torch.sqrt((d * d).mean(dims, keepdim=True) + eps)
    n = w[0].numel()
    return d / (torch.sqrt((d * d).sum(dims, keepdim=True) / (n - 1)) + eps)


def _apply(w, kind, eps):
    return centralize_weight(w) if kind == "centralization" else standardize_weight(w, eps, kind)


@pytest.mark.parametrize("kind", ["centralization", "sqrt_var", "std_plus_eps"])
@pytest.mark.parametrize("shape", [(5, 3, 3, 3), (4, 2, 1, 1), (6, 7)])
def test_gradient_matches_autograd_of_the_formula(kind, shape):
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(shape, generator=gen, dtype=torch.float64) * 0.05 + 0.01).requires_grad_()
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    out, ref = _apply(w, kind, 1e-3), _explicit(w, kind, 1e-3)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    (got,) = torch.autograd.grad(out, w, g)
    (want,) = torch.autograd.grad(ref, w, g)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "transform,kind",
    [
        (WeightCentralization(), "centralization"),
        (WeightStandardization(1e-5, "sqrt_var"), "sqrt_var"),
        (WeightStandardization(1e-5, "std_plus_eps"), "std_plus_eps"),
    ],
)
def test_prepared_conv_rebuilds_w_hat_in_backward(transform, kind):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False).double()
    raw = conv.weight.detach().clone().requires_grad_()
    apply_weight_transform(conv, transform)
    made = []
    conv.parametrizations.weight[0].register_forward_hook(lambda m, a, o: made.append(weakref.ref(o)))
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64, requires_grad=True)
    y = conv(x)
    release_transformed_weight(y)  # what the norm after the conv does
    gc.collect()
    assert made[0]() is None  # nothing of the size of W kept for backward
    g = torch.randn_like(y)
    y.backward(g)
    y_ref = F.conv2d(x.detach().requires_grad_(), _explicit(raw, kind, 1e-5), padding=1)
    (gw_ref,) = torch.autograd.grad(y_ref, raw, g)
    torch.testing.assert_close(y.detach(), y_ref.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(conv.parametrizations.weight.original.grad, gw_ref, rtol=1e-9, atol=1e-9)


def test_weight_changed_before_backward_is_an_error():
    conv = apply_weight_transform(nn.Conv2d(3, 4, 3, bias=False), WeightStandardization())
    y = conv(torch.randn(1, 3, 5, 5, requires_grad=True))
    release_transformed_weight(y)
    with torch.no_grad():
        conv.parametrizations.weight.original.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place|modified by an inplace operation"):
        y.sum().backward()


def test_gn_ws_and_mabn_release_the_weight_of_their_conv():
    from d2norm.layers import GroupNormWS, MovingAverageBatchNorm2d

    for norm in (GroupNormWS(2, 6), MovingAverageBatchNorm2d(6, buffer_size=2)):
        conv = nn.Conv2d(4, 6, 3, bias=False)
        norm.prepare_preceding_conv(conv)
        made = []
        conv.parametrizations.weight[0].register_forward_hook(
            lambda m, a, o, made=made: made.append(weakref.ref(o))
        )
        out = norm(conv(torch.randn(2, 4, 7, 7, requires_grad=True)))
        gc.collect()
        assert made[0]() is None, type(norm).__name__
        out.square().sum().backward()
        assert conv.parametrizations.weight.original.grad is not None


def test_release_leaves_other_tensors_alone():
    conv = nn.Conv2d(3, 4, 3, bias=False)  # no transform: the conv keeps its weight as saved
    y = conv(torch.randn(1, 3, 5, 5, requires_grad=True))
    release_transformed_weight(y)
    release_transformed_weight(torch.randn(3))
    y.sum().backward()
    assert conv.weight.grad is not None
