"""GN against torch.nn.GroupNorm and a float64 recomputation; SyncBN in one process == BN."""
import pytest
import torch
from torch import nn

from d2norm.layers import GroupNorm, SyncBatchNorm2d


def _gn_reference_f64(x, groups, weight, bias, eps):
    n, c, h, w = x.shape
    xg = x.double().reshape(n, groups, -1)
    mean = xg.mean(-1, keepdim=True)
    var = ((xg - mean) ** 2).mean(-1, keepdim=True)  # biased
    y = ((xg - mean) / torch.sqrt(var + eps)).reshape(n, c, h, w)
    return y * weight.double().view(1, -1, 1, 1) + bias.double().view(1, -1, 1, 1)


@pytest.mark.parametrize("groups,channels", [(32, 64), (8, 64), (1, 16), (16, 16)])
def test_group_norm_matches_float64_and_torch(groups, channels):
    torch.manual_seed(0)
    gn = GroupNorm(groups, channels)
    with torch.no_grad():
        gn.weight.uniform_(0.5, 1.5)
        gn.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, channels, 7, 5) * 3 + 1
    y = gn(x)
    ref = _gn_reference_f64(x, groups, gn.weight, gn.bias, gn.eps)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    torch_gn = nn.GroupNorm(groups, channels)
    torch_gn.load_state_dict(gn.state_dict())
    torch.testing.assert_close(y, torch_gn(x))
    gn.eval()
    torch.testing.assert_close(gn(x), y)  # identical in eval


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


def test_sync_bn_single_process_equals_bn():
    assert not torch.distributed.is_initialized()
    ours, ref = _pair()
    for step in range(3):
        x = torch.randn(2, 6, 5, 4) * (step + 1) + step
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), ref(xb)
        torch.testing.assert_close(ya, yb)
        g = torch.randn_like(ya)
        ya.backward(g)
        yb.backward(g)
        torch.testing.assert_close(xa.grad, xb.grad)
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
        torch.testing.assert_close(ours.bias.grad, ref.bias.grad)
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    ours.eval()
    ref.eval()
    x = torch.randn(3, 6, 2, 2)
    torch.testing.assert_close(ours(x), ref(x))


def test_sync_bn_empty_batch():
    ours, _ = _pair()
    before = ours.running_mean.clone(), ours.running_var.clone()
    x = torch.zeros(0, 6, 5, 4, requires_grad=True)
    y = ours(x)
    assert y.shape == x.shape
    y.sum().backward()  # graph is intact
    assert torch.equal(ours.running_mean, before[0]) and torch.equal(ours.running_var, before[1])
