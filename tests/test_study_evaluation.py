"""Re-estimated statistics and the val loss of the study's evaluation (d2norm/study/evaluation.py),
against float64 recomputations of the population statistics written here."""

import pytest
import torch
from torch import nn

from d2norm.layers import BatchRenorm2d, GroupNorm, MovingAverageBatchNorm2d
from d2norm.study.evaluation import reestimate_statistics, running_statistics_norms, validation_loss

D = torch.float64


class Net(nn.Module):
    """conv -> norm1 -> relu -> conv -> norm2; takes a list holding one (N, C, H, W) tensor (the
    study calls ``model(batch)`` with a list of image dicts)."""

    def __init__(self, norm1, norm2):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.n1 = nn.Conv2d(3, 6, 3, padding=1, bias=False), norm1
        self.c2, self.n2 = nn.Conv2d(6, 6, 3, padding=1, bias=False), norm2
        with torch.no_grad():
            for n in (norm1, norm2):
                n.weight.uniform_(0.5, 1.5)
                n.bias.uniform_(-0.5, 0.5)

    def forward(self, batch):
        return self.n2(self.c2(torch.relu(self.n1(self.c1(batch[0])))))


def _population(xs, dims=(0, 2, 3)):
    allx = (
        torch.cat([x.reshape(x.shape[0], x.shape[1], -1) for x in xs], 0)
        .transpose(0, 1)
        .reshape(xs[0].shape[1], -1)
    )
    mean = allx.mean(1)
    return mean, ((allx - mean[:, None]) ** 2).mean(1), (allx**2).mean(1)


def _reference(net, batches, kind1, kind2):
    """Population statistics of each norm's input when each norm normalizes with its own batch's
    statistics (mean / biased variance, or the second moment for MABN), in float64."""

    def batch_norm(x, norm, kind):
        if kind == "second_moment":
            z = x / torch.sqrt((x * x).mean((0, 2, 3), keepdim=True) + norm.eps)
        else:
            m = x.mean((0, 2, 3), keepdim=True)
            v = ((x - m) ** 2).mean((0, 2, 3), keepdim=True)
            z = (x - m) / torch.sqrt(v + norm.eps)
        return z * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)

    with torch.no_grad():
        in1 = [net.c1(b[0]) for b in batches]
        in2 = [net.c2(torch.relu(batch_norm(x, net.n1, kind1))) for x in in1]
    return _population(in1), _population(in2)


def _batches(n=4, size=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(size, 3, 5, 7, generator=g, dtype=D) * 2 + 1] for _ in range(n)]


def test_bn_statistics_are_the_population_statistics():
    net = Net(nn.BatchNorm2d(6), nn.BatchNorm2d(6)).to(D)
    net.eval()
    batches = _batches()
    (m1, v1, _), (m2, v2, _) = _reference(net, batches, "mean_var", "mean_var")
    before = {k: v.clone() for k, v in net.state_dict().items() if "num_batches" not in k}
    assert reestimate_statistics(net, batches) == 2
    torch.testing.assert_close(net.n1.running_mean, m1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(net.n1.running_var, v1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(net.n2.running_mean, m2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(net.n2.running_var, v2, rtol=1e-12, atol=1e-12)
    # parameters unchanged, modes restored, forwards restored (eval uses the new statistics)
    for k in ("c1.weight", "n1.weight", "n2.bias"):
        torch.testing.assert_close(net.state_dict()[k], before[k], rtol=0, atol=0)
    assert not net.training and not net.n1.training and "forward" not in net.n1.__dict__
    x = batches[0][0]
    ref = torch.nn.functional.batch_norm(
        net.c1(x), m1, v1, net.n1.weight, net.n1.bias, False, 0.0, net.n1.eps
    )
    torch.testing.assert_close(net.n1(net.c1(x)), ref)


def test_one_batch_gives_torch_batch_statistics():
    """With a single batch, the first norm's statistics are torch's own batch statistics."""
    net = Net(nn.BatchNorm2d(6), nn.BatchNorm2d(6)).to(D)
    batch = _batches(n=1)[0]
    reestimate_statistics(net, [batch])
    y = net.c1(batch[0]).detach()
    torch.testing.assert_close(net.n1.running_mean, y.mean((0, 2, 3)))
    torch.testing.assert_close(net.n1.running_var, y.var((0, 2, 3), unbiased=False))


def test_mabn_second_moment_and_brn_std():
    mabn = MovingAverageBatchNorm2d(6, buffer_size=2)
    brn = BatchRenorm2d(6, eps=1e-3)
    net = Net(mabn, brn).to(D)
    batches = _batches(seed=3)
    (_, _, s1), (m2, v2, _) = _reference(net, batches, "second_moment", "std")
    iters = (mabn.iters.clone(), brn.iters.clone())
    assert [k for _, _, k in running_statistics_norms(net)] == ["second_moment", "std"]
    reestimate_statistics(net, batches)
    torch.testing.assert_close(mabn.running_var, s1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(brn.running_mean, m2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(brn.running_std, torch.sqrt(v2 + 1e-3), rtol=1e-12, atol=1e-12)
    # the layers' training state is untouched (no training forward ran)
    assert int(mabn.iters) == int(iters[0]) and int(brn.iters) == int(iters[1])


def test_statistic_free_norms_are_left_alone_and_unreached_norms_refused():
    net = Net(GroupNorm(2, 6), GroupNorm(2, 6)).to(D)
    assert reestimate_statistics(net, _batches()) == 0
    with pytest.raises(RuntimeError, match="saw no input.*Fix"):
        reestimate_statistics(Net(nn.BatchNorm2d(6), nn.BatchNorm2d(6)).to(D), [])


class LossNet(Net):
    """Returns a loss dict in training mode, as detectron2's meta-architectures do."""

    def forward(self, batch):
        y = super().forward(batch)
        return {"loss_a": (y**2).mean(), "loss_b": y.abs().mean()} if self.training else y


def test_validation_loss_uses_running_statistics_in_training_mode():
    net = LossNet(nn.BatchNorm2d(6), nn.BatchNorm2d(6)).to(D)
    with torch.no_grad():
        for n in (net.n1, net.n2):
            n.running_mean.uniform_(-1, 1)
            n.running_var.uniform_(0.5, 2)
    batches = _batches()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    net.eval()
    ref_a = sum(float((net(b) ** 2).mean()) for b in batches) / len(batches)
    ref_b = sum(float(net(b).abs().mean()) for b in batches) / len(batches)
    out = validation_loss(net, batches)
    assert out["loss_a"] == pytest.approx(ref_a, rel=1e-12)
    assert out["total_loss"] == pytest.approx(ref_a + ref_b, rel=1e-12)
    assert not net.training  # mode restored
    for k, v in net.state_dict().items():  # running statistics not updated
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
