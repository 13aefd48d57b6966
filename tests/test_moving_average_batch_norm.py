"""MovingAverageBatchNorm2d against a float64 step-by-step reference (d2norm.testing)."""

import copy

import pytest
import torch
from torch import nn

from d2norm.layers.moving_average_batch_norm import MovingAverageBatchNorm2d
from d2norm.layers.weight_transforms import (
    WeightCentralization,
    WeightStandardization,
    apply_weight_transform,
    get_weight_transform,
)
from d2norm.testing.mabn_reference import MABNReference, OfficialStyleMABN2d

SHAPE = (2, 3, 4, 5)


def _close(a, b, tol):
    torch.testing.assert_close(a.to(torch.float64), b.to(torch.float64), rtol=tol, atol=tol)


def _run_against_reference(mod, ref, steps, make_x, tol, lr=0.05, seed=0, on_step=None):
    """Train-mode steps on both; compares every output, gradient and buffer at every step."""
    gen = torch.Generator().manual_seed(seed)
    dtype = mod.running_var.dtype
    for step in range(1, steps + 1):
        x = make_x(step, gen)
        dy = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        xin = x.to(dtype).requires_grad_()
        y = mod(xin)
        y.backward(dy.to(dtype))
        y_ref = ref.forward(x, mod.weight, mod.bias)
        dx_ref, dg_ref, db_ref = ref.backward(dy)
        assert int(mod.iters) == ref.iters == step
        _close(y, y_ref, tol)
        _close(xin.grad, dx_ref, tol)
        _close(mod.weight.grad, dg_ref, tol)
        _close(mod.bias.grad, db_ref, tol)
        _close(mod.buffer_x2, ref.buffer_x2, tol)
        _close(mod.buffer_gz, ref.buffer_gz, tol)
        _close(mod.running_var, ref.running_var, tol)
        if on_step is not None:
            on_step(step, ref)
        with torch.no_grad():  # an SGD step so gamma/beta move away from 1/0
            mod.weight -= lr * mod.weight.grad
            mod.bias -= lr * mod.bias.grad
        mod.weight.grad = None
        mod.bias.grad = None


def _randn(step, gen, scale=1.0):
    # per-step varying scale and a non-zero mean (MABN does not subtract the mean)
    s = 0.5 + (step % 7) / 4.0
    return torch.randn(SHAPE, generator=gen, dtype=torch.float64) * s * scale + 0.3


def _make_pair(C=3, B=4, warmup=20, dtype=torch.float64, **kw):
    mod = MovingAverageBatchNorm2d(C, buffer_size=B, warmup_iters=warmup, **kw).to(dtype)
    with torch.no_grad():
        mod.weight.copy_(torch.tensor([1.5, -0.7, 0.9], dtype=dtype)[:C])
        mod.bias.copy_(torch.tensor([0.1, 0.2, -0.3], dtype=dtype)[:C])
    ref = MABNReference(C, B, warmup_iters=warmup, **kw)
    return mod, ref


def test_matches_float64_reference_300_iters():
    mod, ref = _make_pair(B=4, warmup=20)
    switched = []

    def on_step(step, ref):
        switched.append(ref.last_used_moving_average)

    _run_against_reference(mod, ref, 300, _randn, tol=1e-10, on_step=on_step)
    # warm-up switch: current stats for t in 1..19 (t < warmup), moving average from t = 20
    assert switched.index(True) == 20 - 1 and all(switched[19:])


def test_matches_reference_in_float32():
    mod, ref = _make_pair(B=4, warmup=10, dtype=torch.float32)
    _run_against_reference(mod, ref, 60, _randn, tol=2e-4)


def test_buffer_longer_than_warmup():
    # t <= B also forces the current statistics: B = 8, warmup = 3 -> moving average from t = 9
    mod, ref = _make_pair(B=8, warmup=3)
    used = []
    _run_against_reference(
        mod, ref, 30, _randn, tol=1e-10, on_step=lambda s, r: used.append(r.last_used_moving_average)
    )
    assert used.index(True) == 9 - 1


def test_iteration_and_slot_conventions():
    """iters starts at 0, increments before the stats; step t writes slot t % B."""
    B = 3
    mod = MovingAverageBatchNorm2d(2, buffer_size=B, warmup_iters=0).double()
    assert int(mod.iters) == 0
    xs = [torch.rand(2, 2, 3, 3, dtype=torch.float64) * (i + 1) for i in range(5)]
    for t, x in enumerate(xs, start=1):
        xin = x.clone().requires_grad_()
        y = mod(xin)
        assert int(mod.iters) == t
        chi = (x * x).mean(dim=(0, 2, 3))
        _close(mod.buffer_x2[t % B], chi, 1e-12)
        if t <= B:  # current statistics
            _close(y, x / torch.sqrt(chi + mod.eps).view(1, -1, 1, 1), 1e-12)
        else:  # simple moving average of the last B
            last = torch.stack([(xx * xx).mean(dim=(0, 2, 3)) for xx in xs[t - B : t]]).mean(0)
            _close(y, x / torch.sqrt(last + mod.eps).view(1, -1, 1, 1), 1e-12)
        y.backward(torch.ones_like(y))
        assert mod.buffer_gz[t % B].abs().sum() > 0  # psi written to the same slot in backward
    # first step wrote slot 1 (not 0)
    fresh = MovingAverageBatchNorm2d(2, buffer_size=B)
    fresh(torch.rand(2, 2, 3, 3))
    assert fresh.buffer_x2[0].abs().sum() == 0 and fresh.buffer_x2[1].abs().sum() > 0


def _abrupt(step, gen, switch_at=1000):
    x = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    if step > switch_at:
        # channel 0 jumps x100 (-> r clamped at 5), channel 1 x1.5 (inside the clamp),
        # channel 2 x0.001 (-> r clamped at 1/5)
        x = x * torch.tensor([100.0, 1.5, 1e-3], dtype=torch.float64).view(1, 3, 1, 1)
    return x


def test_renorm_clamp_against_reference():
    mod, ref = _make_pair(B=2, warmup=20)
    rs = {}
    _run_against_reference(
        mod, ref, 1010, _abrupt, tol=1e-9, lr=0.0, on_step=lambda s, r: rs.__setitem__(s, r.last_r.clone())
    )
    for t in range(1, 1001):
        assert torch.equal(rs[t], torch.ones(3, dtype=torch.float64))
    # t = 1001 is the first step with the clamp active (t > max(1000, warmup)); with B = 2 the
    # moving average of chi is fully "after the jump" from t = 1002 on
    assert rs[1001][0] == 5.0 and rs[1002][0] == 5.0
    assert rs[1002][2] == 0.2 and rs[1010][2] == 0.2
    assert 1.2 < rs[1002][1] < 1.6


def test_renorm_waits_for_long_warmup():
    warmup = 1003
    mod, ref = _make_pair(B=2, warmup=warmup)
    rs = {}
    _run_against_reference(
        mod,
        ref,
        warmup + 3,
        _abrupt,
        tol=1e-9,
        lr=0.0,
        on_step=lambda s, r: rs.__setitem__(s, r.last_r.clone()),
    )
    for t in range(1, warmup + 1):  # r == 1 for t <= max(1000, warmup) despite the jump at 1001
        assert torch.equal(rs[t], torch.ones(3, dtype=torch.float64))
    # active at t = warmup + 1 (running_var has already followed channel 0's jump part-way)
    assert rs[warmup + 1][0] > 2.0 and rs[warmup + 1][2] == 0.2 and rs[warmup + 1][1] > 1.1


def test_backward_equals_autograd_while_current_stats():
    """With current statistics and r = 1 the MABN backward is the exact gradient."""
    mod = MovingAverageBatchNorm2d(3, buffer_size=4, warmup_iters=50).double()
    with torch.no_grad():
        mod.weight.uniform_(0.5, 1.5)
        mod.bias.uniform_(-0.5, 0.5)
    for _ in range(3):
        x = torch.randn(SHAPE, dtype=torch.float64, requires_grad=True)
        dy = torch.randn(SHAPE, dtype=torch.float64)
        w = mod.weight.detach().clone().requires_grad_()
        b = mod.bias.detach().clone().requires_grad_()
        mod.weight.grad = mod.bias.grad = None
        y = mod(x)
        (gx,) = torch.autograd.grad(y, x, dy, retain_graph=True)
        y.backward(dy)
        x2 = x.detach().clone().requires_grad_()
        y2 = w.view(1, -1, 1, 1) * x2 / torch.sqrt(
            (x2 * x2).mean(dim=(0, 2, 3), keepdim=True) + mod.eps
        ) + b.view(1, -1, 1, 1)
        y2.backward(dy)
        _close(y, y2, 1e-12)
        _close(gx, x2.grad, 1e-10)
        _close(mod.weight.grad, w.grad, 1e-10)
        _close(mod.bias.grad, b.grad, 1e-10)


def test_eval_is_affine_and_state_frozen():
    mod, ref = _make_pair(B=4, warmup=5)
    _run_against_reference(mod, ref, 12, _randn, tol=1e-10)
    mod.eval()
    before = copy.deepcopy(mod.state_dict())
    x = torch.randn(SHAPE, dtype=torch.float64)
    y = mod(x)
    _close(y, ref.eval_forward(x, mod.weight, mod.bias), 1e-12)
    for k, v in mod.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_state_dict_round_trip_continues_exactly():
    a = MovingAverageBatchNorm2d(3, buffer_size=4, warmup_iters=6)
    assert set(a.state_dict()) == {"weight", "bias", "iters", "buffer_x2", "buffer_gz", "running_var"}
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)) for _ in range(40)]
    for x, dy in data[:25]:
        a(x.requires_grad_()).backward(dy)
    b = MovingAverageBatchNorm2d(3, buffer_size=4, warmup_iters=6)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    for x, dy in data[25:]:
        xa, xb = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
        ya, yb = a(xa), b(xb)
        ya.backward(dy)
        yb.backward(dy)
        assert torch.equal(ya, yb) and torch.equal(xa.grad, xb.grad)
    for k in a.state_dict():
        assert torch.equal(a.state_dict()[k], b.state_dict()[k]), k
    # the psi buffer written in backward lives in the module buffer / state_dict
    assert b.state_dict()["buffer_gz"].data_ptr() == b.buffer_gz.data_ptr()
    assert b.buffer_gz.abs().sum() > 0


def test_loads_official_state_layout():
    a = MovingAverageBatchNorm2d(3, buffer_size=2)
    sd = a.state_dict()
    sd["running_var"] = torch.full((1, 3, 1, 1), 2.0)
    sd["iters"] = torch.tensor([7])
    a.load_state_dict(sd)
    assert a.running_var.shape == (3,) and int(a.iters) == 7 and a.running_var[0] == 2.0


def test_official_style_matches_ours():
    ours = MovingAverageBatchNorm2d(3, buffer_size=4, warmup_iters=10)
    off = OfficialStyleMABN2d(3, buffer_size=4, warmup_iters=10)
    off.load_state_dict(ours.state_dict())
    gen = torch.Generator().manual_seed(3)
    for step in range(60):
        x = torch.randn(SHAPE, generator=gen) * (1 + step % 5)
        dy = torch.randn(SHAPE, generator=gen)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), off(xb)
        ya.backward(dy)
        yb.backward(dy)
        for u, v in [
            (ya, yb),
            (xa.grad, xb.grad),
            (ours.weight.grad, off.weight.grad),
            (ours.bias.grad, off.bias.grad),
        ]:
            torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5)
        ours.weight.grad = ours.bias.grad = off.weight.grad = off.bias.grad = None
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(v, off.state_dict()[k], rtol=1e-4, atol=1e-6)


class _NoHostSync:
    """Make every host read of a tensor value raise (CPU stand-in for cuda sync debug mode)."""

    NAMES = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")

    def __init__(self, monkeypatch):
        def boom(*a, **k):
            raise AssertionError("host read of a tensor value (a device sync on GPU)")

        for n in self.NAMES:
            monkeypatch.setattr(torch.Tensor, n, boom)


def test_no_host_sync_in_forward_backward(monkeypatch):
    mod = MovingAverageBatchNorm2d(3, buffer_size=2, warmup_iters=1)
    off = OfficialStyleMABN2d(3, buffer_size=2, warmup_iters=1)
    xs = [torch.randn(SHAPE, requires_grad=True) for _ in range(4)]
    _NoHostSync(monkeypatch)
    for x in xs:  # covers current-stat and moving-average steps
        mod(x).sum().backward()
    with pytest.raises(AssertionError, match="host read"):  # positive control
        off(xs[0])
    monkeypatch.undo()
    assert int(mod.iters) == 4


def test_iters_advance_once_per_training_forward_only():
    mod = MovingAverageBatchNorm2d(3, buffer_size=2)
    x = torch.randn(SHAPE)
    mod(x)
    mod(x)
    mod.eval()
    mod(x)
    assert int(mod.iters) == 2


def test_empty_input():
    mod = MovingAverageBatchNorm2d(3, buffer_size=2)
    before = copy.deepcopy(mod.state_dict())
    x = torch.randn(0, 3, 4, 5, requires_grad=True)
    y = mod(x)
    assert y.shape == x.shape and y.grad_fn is not None
    y.sum().backward()
    assert torch.equal(mod.weight.grad, torch.zeros(3)) and torch.equal(mod.bias.grad, torch.zeros(3))
    for k, v in mod.state_dict().items():
        if k in before:
            assert torch.equal(v, before[k]), k


def test_autocast_keeps_stats_in_fp32():
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    mod = MovingAverageBatchNorm2d(4, buffer_size=2, warmup_iters=0)
    x = torch.randn(2, 3, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(x)
        y = mod(h)
    assert h.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    y.float().sum().backward()
    for name in ("buffer_x2", "buffer_gz", "running_var"):
        assert getattr(mod, name).dtype == torch.float32, name
    assert mod.weight.grad.dtype == torch.float32 and conv.weight.grad is not None
    chi = (h.detach().float() ** 2).mean(dim=(0, 2, 3))
    torch.testing.assert_close(mod.buffer_x2[1], chi, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        y.float(), (h.float() / torch.sqrt(chi + mod.eps).view(1, -1, 1, 1)), rtol=2e-2, atol=2e-2
    )


@pytest.mark.parametrize(
    "kwargs,arg,key",
    [
        (dict(buffer_size=0), "buffer_size", "D2NORM.MABN.BUFFER_SIZE"),
        (dict(buffer_size=2.5), "buffer_size", "D2NORM.MABN.BUFFER_SIZE"),
        (dict(buffer_size=2, warmup_iters=-1), "warmup_iters", "D2NORM.MABN.WARMUP_ITERS"),
        (dict(buffer_size=2, momentum=1.0), "momentum", "D2NORM.MABN.MOMENTUM"),
        (dict(buffer_size=2, momentum=-0.1), "momentum", "D2NORM.MABN.MOMENTUM"),
    ],
)
def test_bad_config(kwargs, arg, key):
    with pytest.raises(ValueError) as e:
        MovingAverageBatchNorm2d(8, **kwargs)
    msg = str(e.value)
    assert arg in msg and key in msg and "Set " in msg


def test_rejects_non_4d():
    with pytest.raises(ValueError, match="N, C, H, W"):
        MovingAverageBatchNorm2d(3, buffer_size=2)(torch.randn(2, 3, 4))


def test_prepare_preceding_conv_idempotent():
    conv = nn.Conv2d(3, 4, 3, bias=False)
    raw = conv.weight.detach().clone()
    mod = MovingAverageBatchNorm2d(4, buffer_size=2)
    mod.prepare_preceding_conv(conv)
    mod.prepare_preceding_conv(conv)
    assert len(conv.parametrizations["weight"]) == 1
    assert isinstance(get_weight_transform(conv), WeightCentralization)
    torch.testing.assert_close(conv.weight, raw - raw.mean(dim=(1, 2, 3), keepdim=True))
    ws_conv = apply_weight_transform(nn.Conv2d(3, 4, 3), WeightStandardization())
    with pytest.raises(RuntimeError, match="already has"):
        mod.prepare_preceding_conv(ws_conv)


def test_detectron2_conv_with_mabn_norm():
    from detectron2.layers import Conv2d

    norm = MovingAverageBatchNorm2d(8, buffer_size=2, warmup_iters=0)
    conv = Conv2d(3, 8, 3, padding=1, bias=False, norm=norm)
    conv.norm.prepare_preceding_conv(conv)
    x = torch.randn(2, 3, 8, 8)
    y = conv(x)
    y.square().mean().backward()
    w = conv.parametrizations.weight.original
    assert w.grad is not None and norm.weight.grad is not None
    # the centralized conv output has zero mean over each output channel's kernel
    assert conv.weight.mean(dim=(1, 2, 3)).abs().max() < 1e-6


def test_channels_last_and_partial_requires_grad():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 5, 6, generator=gen, dtype=torch.float64)
    dy = torch.randn(2, 4, 5, 6, generator=gen, dtype=torch.float64)
    a = MovingAverageBatchNorm2d(4, buffer_size=2, warmup_iters=0).double()
    b = copy.deepcopy(a)
    for _ in range(4):
        xa = x.clone().requires_grad_()
        xb = x.clone().to(memory_format=torch.channels_last).requires_grad_()
        ya, yb = a(xa), b(xb)
        ya.backward(dy)
        yb.backward(dy.to(memory_format=torch.channels_last))
        _close(ya, yb, 1e-12)
        _close(xa.grad, xb.grad, 1e-12)
        _close(a.weight.grad, b.weight.grad, 1e-12)
    _close(a.buffer_gz, b.buffer_gz, 1e-12)
    # frozen beta and an input without grad: only gamma's gradient, psi still recorded
    c = MovingAverageBatchNorm2d(4, buffer_size=2).double()
    c.bias.requires_grad_(False)
    c(x).backward(dy)
    assert c.weight.grad is not None and c.bias.grad is None and c.buffer_gz[1].abs().sum() > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_no_sync_and_matches_cpu():
    cpu = MovingAverageBatchNorm2d(3, buffer_size=2, warmup_iters=1)
    gpu = copy.deepcopy(cpu).cuda()
    gen = torch.Generator().manual_seed(7)
    data = [(torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)) for _ in range(5)]
    xs_gpu = [(x.cuda().requires_grad_(), dy.cuda()) for x, dy in data]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ys = []
        for x, dy in xs_gpu:
            y = gpu(x)
            y.backward(dy)
            ys.append(y)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for (x, dy), y, (xg, _) in zip(data, ys, xs_gpu):
        x = x.clone().requires_grad_()
        yc = cpu(x)
        yc.backward(dy)
        torch.testing.assert_close(y.cpu(), yc, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(xg.grad.cpu(), x.grad, rtol=1e-4, atol=1e-5)
    for k, v in cpu.state_dict().items():
        torch.testing.assert_close(gpu.state_dict()[k].cpu(), v, rtol=1e-4, atol=1e-6)
