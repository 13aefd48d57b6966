"""GN built from the config and SyncBN in one process, against float64 recomputations of their
formulas (the multi-process SyncBN math: test_distributed.py)."""
import pytest
import torch
from torch import nn

import d2norm
from d2norm.layers import GroupNorm, SyncBatchNorm2d
from helpers import synthetic_cfg


def _gn_reference_f64(x, groups, weight, bias, eps):
    n, c, h, w = x.shape
    xg = x.double().reshape(n, groups, -1)
    mean = xg.mean(-1, keepdim=True)
    var = ((xg - mean) ** 2).mean(-1, keepdim=True)  # biased
    y = ((xg - mean) / torch.sqrt(var + eps)).reshape(n, c, h, w)
    return y * weight.double().view(1, -1, 1, 1) + bias.double().view(1, -1, 1, 1)


@pytest.mark.parametrize("groups,eps", [(8, 1e-3), (1, 1e-5)])
def test_gn_built_from_the_config_matches_float64(groups, eps):
    """``NORM: "GN"`` in a model: the group count and eps come from D2NORM.GN (detectron2's own
    "GN" would use 32 groups), and the layer computes GN's formula."""
    torch.manual_seed(0)
    cfg = synthetic_cfg("GN", **{"MODEL.DEVICE": "cpu", "D2NORM.GN.NUM_GROUPS": groups,
                                 "D2NORM.GN.EPS": eps})
    model = d2norm.build_model(cfg)
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(isinstance(m, GroupNorm) for m in norms)
    for gn in norms[:3]:
        channels = gn.num_channels
        with torch.no_grad():
            gn.weight.uniform_(0.5, 1.5)
            gn.bias.uniform_(-0.5, 0.5)
        x = torch.randn(2, channels, 7, 5) * 3 + 1
        ref = _gn_reference_f64(x, groups, gn.weight, gn.bias, eps)
        torch.testing.assert_close(gn(x).double(), ref, rtol=1e-5, atol=1e-5)
        gn.eval()
        torch.testing.assert_close(gn(x).double(), ref, rtol=1e-5, atol=1e-5)  # same in eval


def test_group_norm_bad_groups():
    with pytest.raises(ValueError, match="does not divide the 60 channels"):
        GroupNorm(32, 60)
    with pytest.raises(ValueError, match="positive integer"):
        GroupNorm(0, 64)


def _pair(c=6):
    torch.manual_seed(1)
    ours, ref = SyncBatchNorm2d(c), nn.BatchNorm2d(c)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.uniform_(-1, 1)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def _bn_train_f64(x, weight, bias, eps):
    """BN's training forward in float64 (biased batch variance); also returns the statistics."""
    x = x.double()
    mean = x.mean(dim=(0, 2, 3))
    var = ((x - mean.view(1, -1, 1, 1)) ** 2).mean(dim=(0, 2, 3))
    y = (x - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + eps)
    return y * weight.double().view(1, -1, 1, 1) + bias.double().view(1, -1, 1, 1), mean, var


def test_sync_bn_single_process_matches_float64_bn_math():
    """One process: the formula of the module docstring with a single rank, its gradients
    (float64 autograd of that formula) and running statistics (momentum, unbiased variance)."""
    assert not torch.distributed.is_initialized()
    ours, _ = _pair()
    c, m, eps = ours.num_features, ours.momentum, ours.eps
    w64 = ours.weight.detach().double().requires_grad_()
    b64 = ours.bias.detach().double().requires_grad_()
    running_mean = torch.zeros(c, dtype=torch.float64)
    running_var = torch.ones(c, dtype=torch.float64)
    for step in range(3):
        x = torch.randn(2, c, 5, 4) * (step + 1) + step
        xa, x64 = x.clone().requires_grad_(), x.double().requires_grad_()
        ya = ours(xa)
        y64, mean, var = _bn_train_f64(x64, w64, b64, eps)
        torch.testing.assert_close(ya.double(), y64, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(ya)
        ours.weight.grad = ours.bias.grad = w64.grad = b64.grad = None
        ya.backward(g)
        y64.backward(g.double())
        torch.testing.assert_close(xa.grad.double(), x64.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.weight.grad.double(), w64.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.bias.grad.double(), b64.grad, rtol=1e-4, atol=1e-5)
        n = x.numel() // c
        running_mean = (1 - m) * running_mean + m * mean.detach()
        running_var = (1 - m) * running_var + m * var.detach() * n / (n - 1)
        torch.testing.assert_close(ours.running_mean.double(), running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.running_var.double(), running_var, rtol=1e-5, atol=1e-6)
    ours.eval()
    x = torch.randn(3, c, 2, 2)
    ref = (x.double() - running_mean.view(1, -1, 1, 1)) / torch.sqrt(running_var.view(1, -1, 1, 1) + eps)
    ref = ref * w64.detach().view(1, -1, 1, 1) + b64.detach().view(1, -1, 1, 1)
    torch.testing.assert_close(ours(x).double(), ref, rtol=1e-5, atol=1e-5)


def test_sync_bn_empty_batch():
    ours, _ = _pair()
    before = ours.running_mean.clone(), ours.running_var.clone()
    x = torch.zeros(0, 6, 5, 4, requires_grad=True)
    y = ours(x)
    assert y.shape == x.shape
    y.sum().backward()  # graph is intact
    assert torch.equal(ours.running_mean, before[0]) and torch.equal(ours.running_var, before[1])
