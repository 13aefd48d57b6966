"""GN against torch.nn.GroupNorm and a float64 recomputation; SyncBN in one process == BN, its
all-reduce path against float64 BN math without host reads, and its input shapes."""
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
        torch.testing.assert_close(y.double(), _bn64_train(x, (0, 2, 3), ours.weight, ours.bias, ours.eps),
                                   rtol=1e-5, atol=1e-5)
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
    torch.testing.assert_close(ours(x).double(), _bn64_train(x, dims, ours.weight, ours.bias, ours.eps),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"\(N, C, \*\)"):
        ours(torch.randn(6))
