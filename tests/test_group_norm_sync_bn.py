"""GN built from the config, SyncBN in one process, and SyncBN's all-reduce path (without host
reads) against float64 recomputations of their formulas; SyncBN's input shapes. The
multi-process SyncBN math: test_distributed.py."""

import pytest
import torch
from helpers import synthetic_cfg
from torch import nn

import d2norm
from d2norm.layers import GroupNorm, SyncBatchNorm2d


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
    cfg = synthetic_cfg("GN", **{"MODEL.DEVICE": "cpu", "D2NORM.GN.NUM_GROUPS": groups, "D2NORM.GN.EPS": eps})
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
        y64 = _bn64_train(x64, (0, 2, 3), w64, b64, eps)
        mean, var = x64.mean((0, 2, 3)), x64.var((0, 2, 3), unbiased=False)
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


# ------------------------------------------------------------------ the all-reduce path
def _one_rank_of_a_group(monkeypatch):
    """Run SyncBatchNorm2d's multi-process path in this process: a world of 2 where the other rank
    contributes nothing, so the all-reduce is the identity and the result must equal BN on the
    local batch."""
    import d2norm.layers.sync_batch_norm as sbn

    monkeypatch.setattr(sbn, "distributed_world_size", lambda: 2)
    monkeypatch.setattr(sbn, "all_reduce_sum", lambda t: t)


class _NoHostSync:
    """Make every host read of a tensor value raise (CPU stand-in for CUDA's sync debug mode)."""

    NAMES = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")

    def __init__(self, monkeypatch):
        def boom(*a, **k):
            raise AssertionError("host read of a tensor value (a device sync on GPU)")

        for n in self.NAMES:
            monkeypatch.setattr(torch.Tensor, n, boom)


def _bn64_train(x, mean_var_dims, weight, bias, eps):
    xd = x.double()
    mean = xd.mean(mean_var_dims, keepdim=True)
    var = ((xd - mean) ** 2).mean(mean_var_dims, keepdim=True)
    shape = [1, -1] + [1] * (x.dim() - 2)
    return (xd - mean) / torch.sqrt(var + eps) * weight.double().view(shape) + bias.double().view(shape)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_sync_bn_all_reduce_path_has_no_host_sync_and_matches_float64(monkeypatch, momentum):
    _one_rank_of_a_group(monkeypatch)
    torch.manual_seed(2)
    ours = SyncBatchNorm2d(6, momentum=momentum)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.uniform_(-1, 1)
    ref = nn.BatchNorm2d(6, momentum=momentum).double()  # torch's running-statistics rule
    ref.load_state_dict(ours.state_dict())
    xs = [torch.randn(2, 6, 5, 4) * (s + 1) + s for s in range(3)]
    _NoHostSync(monkeypatch)
    with pytest.raises(AssertionError, match="host read"):  # positive control: a sync is caught
        torch.ones(1).item()
    outs = []
    for x in xs:
        x = x.clone().requires_grad_()
        y = ours(x)
        y.sum().backward()
        outs.append(y.detach())
    monkeypatch.undo()
    for x, y in zip(xs, outs):
        torch.testing.assert_close(
            y.double(), _bn64_train(x, (0, 2, 3), ours.weight, ours.bias, ours.eps), rtol=1e-5, atol=1e-5
        )
        ref(x.double())
    assert int(ours.num_batches_tracked) == 3
    torch.testing.assert_close(ours.running_mean.double(), ref.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.running_var.double(), ref.running_var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(4, 6), (3, 6, 5), (2, 6, 3, 4, 2)])
def test_sync_bn_accepts_what_torch_sync_bn_accepts(monkeypatch, shape):
    """detectron2's "SyncBN" was nn.SyncBatchNorm, which takes (N, C, *) inputs."""
    torch.manual_seed(3)
    ours = SyncBatchNorm2d(6)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.uniform_(-1, 1)
        ours.running_mean.uniform_(-1, 1)
        ours.running_var.uniform_(0.5, 2)
    theirs = nn.SyncBatchNorm(6)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(shape)
    ours.eval()
    theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x))
    ours.train()
    _one_rank_of_a_group(monkeypatch)
    dims = tuple(d for d in range(x.dim()) if d != 1)
    torch.testing.assert_close(
        ours(x).double(), _bn64_train(x, dims, ours.weight, ours.bias, ours.eps), rtol=1e-5, atol=1e-5
    )
    with pytest.raises(ValueError, match=r"\(N, C, \*\)"):
        ours(torch.randn(6))
