"""CrossIterationBatchNorm2d against a float64 reference computed from the definition."""

import copy
import logging
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from d2norm.layers.cross_iteration_batch_norm import CrossIterationBatchNorm2d
from d2norm.testing.cbn_reference import ReferenceConvCBN

D = torch.float64
# SGD step: with these tiny random convs the weight gradients are large relative to the weights;
# at 2e-4 a window spans a relative weight change of ~10-30% and the clamp stays inactive (it is
# exercised by test_variance_clamp and the "large_steps" case).
LR = 2e-4


def _conv(cin, cout, k=3, stride=1, padding=1, dilation=1, groups=1, seed=0):
    torch.manual_seed(seed)
    return nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias=False).to(D)


class Pair(nn.Module):
    """A standalone conv + CBN pair (siblings), bound."""

    def __init__(self, conv, cbn):
        super().__init__()
        self.conv, self.cbn = conv, cbn
        cbn.bind(conv)

    def forward(self, x):
        return self.cbn(self.conv(x))


def _make(conv_kw, buffer_size=3, burnin=0, cin=4, cout=6, grad_through_compensation=False):
    conv = _conv(cin, cout, **conv_kw)
    pair = Pair(
        conv,
        CrossIterationBatchNorm2d(
            cout, buffer_size, burnin, grad_through_compensation=grad_through_compensation
        ).to(D),
    )
    with torch.no_grad():  # non-trivial gamma/beta
        pair.cbn.weight.uniform_(0.5, 1.5)
        pair.cbn.bias.uniform_(-0.5, 0.5)
    ref = ReferenceConvCBN(
        copy.deepcopy(conv), buffer_size, burnin, grad_through_compensation=grad_through_compensation
    )
    with torch.no_grad():
        ref.weight.copy_(pair.cbn.weight)
        ref.bias.copy_(pair.cbn.bias)
    return pair, ref


def _leaf_weight(conv):
    if parametrize.is_parametrized(conv, "weight"):
        return conv.parametrizations.weight.original
    return conv.weight


def _params(m):
    if isinstance(m, Pair):
        return [_leaf_weight(m.conv), m.cbn.weight, m.cbn.bias]
    if isinstance(m, ReferenceConvCBN):
        return [_leaf_weight(m.conv), m.weight, m.bias]
    return [m[0].weight, m[1].weight, m[1].bias]


def _step(model, x, g, lr=None):
    """One SGD iteration; returns output, input grad, parameter grads."""
    lr = LR if lr is None else lr
    x = x.clone().requires_grad_(True)
    out = model(x)
    (out * g).sum().backward()
    grads = [p.grad.clone() for p in _params(model)]
    with torch.no_grad():
        for p in _params(model):
            p -= lr * p.grad
            p.grad = None
    return out.detach(), x.grad, grads


def _inputs(n_iter, shape, seed=1):
    gen = torch.Generator().manual_seed(seed)
    # non-zero mean and a drift across iterations, so the statistics move
    return [torch.randn(shape, generator=gen, dtype=D) * (1 + 0.3 * i) + 0.5 for i in range(n_iter)]


def _assert_close(a, b, what, tol=1e-9):
    assert torch.allclose(a, b, rtol=tol, atol=tol), f"{what}: max diff {(a - b).abs().max().item():.3e}"


def _compare(pair, ref, xs, tol=1e-9, lr=None):
    for i, x in enumerate(xs):
        with torch.no_grad():
            g_shape = pair.conv(x).shape
        pair.conv.__dict__.pop("_d2norm_cbn_input", None)  # that conv call was not for the CBN
        g = torch.randn(g_shape, generator=torch.Generator().manual_seed(100 + i), dtype=D)
        oa, xa, ga = _step(pair, x, g, lr)
        ob, xb, gb = _step(ref, x, g, lr)
        _assert_close(oa, ob, f"iter {i} output", tol)
        _assert_close(xa, xb, f"iter {i} input grad", tol)
        for name, a, b in zip(("conv weight", "gamma", "beta"), ga, gb):
            _assert_close(a, b, f"iter {i} {name} grad", tol)
    _assert_close(pair.cbn.running_mean, ref.running_mean, "running_mean", tol)
    _assert_close(pair.cbn.running_var, ref.running_var, "running_var", tol)


CASES = {  # conv, buffer_size, burnin[, lr]
    "k3_3x3": (dict(k=3, padding=1), 3, 0),
    "k3_large_steps": (dict(k=3, padding=1), 3, 0, 0.2),  # clamp active in some channels
    "k4_3x3": (dict(k=3, padding=1), 4, 0),
    "k1_plain": (dict(k=3, padding=1), 1, 0),
    "stride2": (dict(k=3, stride=2, padding=1), 3, 0),
    "padding2_no_dil": (dict(k=3, padding=2), 3, 0),
    "dilation2": (dict(k=3, padding=2, dilation=2), 3, 0),
    "groups2_stride2": (dict(k=3, stride=2, padding=1, groups=2), 4, 0),
    "depthwise_1x1": (dict(k=1, padding=0, groups=2), 3, 0),
    "burnin2_k3": (dict(k=3, padding=1), 3, 2),
}


@pytest.mark.parametrize("grad_through_compensation", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64_reference(case, grad_through_compensation):
    conv_kw, k, burnin, *lr = CASES[case]
    pair, ref = _make(conv_kw, k, burnin, grad_through_compensation=grad_through_compensation)
    _compare(pair, ref, _inputs(6, (2, 4, 9, 9)), lr=lr[0] if lr else None)
    assert pair.cbn.iteration == 6 == ref.iteration


def _radial_and_total_weight_grad(grad_through_compensation, seed=0):
    """<W_c, dL/dW_c> and |W_c| |dL/dW_c| of a conv + CBN at the third iteration of a full window
    (k=3), the weights unchanged since the stored iterations (new inputs each iteration)."""
    pair, _ = _make(dict(k=3, padding=1), 3, 0, grad_through_compensation=grad_through_compensation)
    pair.cbn.eps = 1e-14  # eps breaks scale invariance by O(eps / sigma^2)
    xs = _inputs(3, (2, 4, 8, 8), seed=seed)
    gen = torch.Generator().manual_seed(7)
    for _i, x in enumerate(xs):
        out = pair(x)
        g = torch.randn(out.shape, generator=gen, dtype=D) + 0.5  # a persistent bias-like signal
        pair.conv.weight.grad = None
        (out * g).sum().backward()
    w, gw = pair.conv.weight.detach(), pair.conv.weight.grad
    return (w * gw).sum((1, 2, 3)), gw.flatten(1).norm(dim=1) * w.flatten(1).norm(dim=1)


def test_gradient_through_compensation_restores_scale_invariance():
    """At W_t = W_{t-r}, scaling W_c scales y_c and, to first order, every compensated entry of
    channel c (mu_r(W) = <pbar_r, W> is linear; nu_r(W) = <dnu_r/dW, W> - nu_r has derivative
    <dnu_r/dW, W> = 2 nu_r along W), so the window-normalized output is scale invariant and
    <W_c, dL/dW_c> = 0, as for BN. The paper's gradient (compensated entries constant in W_t) is
    not: it carries (1 - 1/n) (gamma dL/dgamma + gamma mu/sigma dL/dbeta) along W_c."""
    radial, scale = _radial_and_total_weight_grad(True)
    assert (radial.abs() < 1e-9 * scale).all(), (radial / scale).abs().max()
    radial_paper, scale_paper = _radial_and_total_weight_grad(False)
    assert (radial_paper.abs() > 1e-2 * scale_paper).any(), (radial_paper / scale_paper).abs().max()


def test_compensation_is_first_order_taylor():
    """mu is linear in W (compensation exact); nu's error is second order in the weight change."""
    conv = _conv(4, 6, padding=1)
    cbn = CrossIterationBatchNorm2d(6, 2).to(D).bind(conv)
    x_old = _inputs(1, (2, 4, 7, 7))[0]
    cbn(conv(x_old))  # records iteration 0
    w0 = conv.weight.detach().clone()
    direction = torch.randn_like(w0)
    errors = []
    for s in (0.1, 0.05):
        w_t = w0 + s * direction
        mu_c, nu_c = cbn._compensated_history(w_t, 1, D)
        y = F.conv2d(x_old, w_t, None, 1, 1)
        _assert_close(mu_c[0], y.mean((0, 2, 3)), "compensated mu", 1e-12)
        errors.append((nu_c[0] - (y * y).mean((0, 2, 3))).abs().max().item())
    assert errors[0] > 1e-6
    assert 3.5 < errors[0] / errors[1] < 4.5  # O(|dW|^2)


def test_k1_equals_torch_batchnorm():
    conv = _conv(4, 6)
    pair = Pair(conv, CrossIterationBatchNorm2d(6, buffer_size=1).to(D))
    bn = nn.Sequential(copy.deepcopy(conv), nn.BatchNorm2d(6).to(D))
    for i, x in enumerate(_inputs(4, (2, 4, 8, 8))):
        g = torch.randn(2, 6, 8, 8, generator=torch.Generator().manual_seed(i), dtype=D)
        oa, xa, ga = _step(pair, x, g)
        ob, xb, gb = _step(bn, x, g)
        for a, b, what in [(oa, ob, "out"), (xa, xb, "x grad")] + list(zip(ga, gb, "wgb")):
            _assert_close(a, b, what, 1e-10)
    _assert_close(pair.cbn.running_mean, bn[1].running_mean, "running_mean", 1e-12)
    _assert_close(pair.cbn.running_var, bn[1].running_var, "running_var", 1e-12)


def test_burnin_switch():
    burnin = 3
    conv = _conv(4, 6)
    pair = Pair(conv, CrossIterationBatchNorm2d(6, buffer_size=3, burnin=burnin).to(D))
    bn = nn.Sequential(copy.deepcopy(conv), nn.BatchNorm2d(6).to(D))
    xs = _inputs(5, (2, 4, 8, 8))
    for i, x in enumerate(xs):
        assert pair.cbn.in_burnin == (i < burnin) and pair.cbn.iteration == i
        g = torch.randn(2, 6, 8, 8, generator=torch.Generator().manual_seed(i), dtype=D)
        oa, xa, ga = _step(pair, x, g)
        ob, xb, gb = _step(bn, x, g)
        if i < burnin:
            _assert_close(oa, ob, f"iter {i} (burn-in) output", 1e-10)
            _assert_close(ga[0], gb[0], f"iter {i} (burn-in) weight grad", 1e-10)
        else:  # history recorded in the last k-1 burn-in iterations: the window is full at once
            assert pair.cbn._count == 2
            assert (oa - ob).abs().max() > 1e-3, f"iter {i}: CBN should differ from BN after burn-in"
            bn[0].load_state_dict(pair.conv.state_dict())  # re-sync, check the next iteration alone
    assert not pair.cbn.in_burnin and pair.cbn.iteration == 5


def test_variance_clamp():
    """Shrinking W by 10x makes the linearized nu of the stored iteration negative (< mu^2)."""
    pair, ref = _make(dict(k=3, padding=1), 2, 0)
    xs = _inputs(3, (2, 4, 8, 8))
    w_recorded = pair.conv.weight.detach().clone()
    _compare(pair, ref, xs[:1])
    with torch.no_grad():
        # W_t = 0.1 W_{t-1}: linearized nu(W_t) = nu (1 - 2 * 0.9) < 0
        w = 0.1 * w_recorded
        pair.conv.weight.copy_(w)
        ref.conv.weight.copy_(w)
        mu_c, nu_c = pair.cbn._compensated_history(pair.conv.weight.detach(), 1, D)
    assert (nu_c < mu_c * mu_c).all(), "test setup: the compensated nu should be below mu^2"
    _compare(pair, ref, xs[1:])  # the reference uses max(nu, mu^2) literally


def _pair_k(seed=0, k=4, burnin=0):
    conv = _conv(4, 6, seed=seed)
    return Pair(conv, CrossIterationBatchNorm2d(6, buffer_size=k, burnin=burnin).to(D))


@pytest.mark.parametrize("k,burnin,n_before", [(4, 0, 5), (3, 5, 4)])
@pytest.mark.parametrize("bind_first", [True, False])
def test_state_dict_round_trip_mid_window(k, burnin, n_before, bind_first):
    xs = _inputs(n_before + 3, (2, 4, 8, 8))
    a = _pair_k(k=k, burnin=burnin)
    for i in range(n_before):
        _step(a, xs[i], torch.ones(2, 6, 8, 8, dtype=D))
    state = copy.deepcopy(a.state_dict())
    assert int(state["cbn.num_iterations"]) == n_before
    # fresh modules with other weights; loaded either after binding or before
    conv = _conv(4, 6, seed=7)
    cbn = CrossIterationBatchNorm2d(6, buffer_size=k, burnin=burnin).to(D)
    if bind_first:
        b = Pair(conv, cbn)
        b.load_state_dict(state)
    else:
        holder = nn.ModuleDict({"conv": conv, "cbn": cbn})
        holder.load_state_dict(state)
        b = Pair(conv, cbn)
    assert b.cbn.iteration == n_before and b.cbn.in_burnin == a.cbn.in_burnin
    for i in range(n_before, n_before + 3):
        g = torch.randn(2, 6, 8, 8, generator=torch.Generator().manual_seed(i), dtype=D)
        oa, xa, ga = _step(a, xs[i], g)
        ob, xb, gb = _step(b, xs[i], g)
        assert torch.equal(oa, ob) and torch.equal(xa, xb)
        assert all(torch.equal(u, v) for u, v in zip(ga, gb))
    assert torch.equal(a.cbn.running_var, b.cbn.running_var)


def test_incompatible_history_restarts_with_warning(caplog):
    a = _pair_k(k=3)
    for x in _inputs(3, (2, 4, 8, 8)):
        _step(a, x, torch.ones(2, 6, 8, 8, dtype=D))
    b = _pair_k(k=4)
    with caplog.at_level(logging.WARNING, logger="d2norm"):
        b.load_state_dict(a.state_dict())
    assert [r.name for r in caplog.records if "restarting the window" in r.getMessage()] == [
        "d2norm.layers.cross_iteration_batch_norm"
    ]
    assert b.cbn._count == 0 and b.cbn.hist_grad_sqmean.shape[0] == 3 and b.cbn.iteration == 3
    # the restarted window holds only the current batch: plain BN with its statistics
    x = _inputs(1, (2, 4, 8, 8))[0]
    with torch.no_grad():
        y = b.conv(x)
        mean, var = y.mean((0, 2, 3), keepdim=True), y.var((0, 2, 3), unbiased=False, keepdim=True)
        bn = (y - mean) / torch.sqrt(var + b.cbn.eps)
        want = bn * b.cbn.weight.view(1, -1, 1, 1) + b.cbn.bias.view(1, -1, 1, 1)
    out, _, _ = _step(b, x, torch.ones(2, 6, 8, 8, dtype=D))
    _assert_close(out, want, "first step after the restart")
    assert b.cbn._count == 1


def test_history_holds_no_weights_and_gives_back_recorded_statistics():
    """Evaluated at the weights it was recorded with, a stored iteration gives back its own mu, nu
    (<pbar, W> = mu, <dnu/dW, W> = 2 nu for a conv without bias); no weights are stored."""
    pair = _pair_k(k=3)
    x = _inputs(1, (2, 4, 8, 8))[0]
    w = pair.conv.weight.detach().clone()
    with torch.no_grad():
        y = pair.conv(x)
    pair.conv.__dict__.pop("_d2norm_cbn_input", None)
    _step(pair, x, torch.ones(2, 6, 8, 8, dtype=D))
    assert not torch.equal(pair.conv.weight, w)  # the SGD step moved W
    mu, nu = pair.cbn._compensated_history(w, 1, D)
    _assert_close(mu[0], y.mean((0, 2, 3)), "mu at the recorded weights", 1e-12)
    _assert_close(nu[0], (y * y).mean((0, 2, 3)), "nu at the recorded weights", 1e-12)
    state = pair.cbn.state_dict()
    hist = sorted(k for k in state if k.startswith("hist_"))
    assert hist == ["hist_count", "hist_grad_mean", "hist_grad_sqmean", "hist_pos", "hist_sqmean"]
    c, fan_in, h = 6, 4 * 9, 2  # (k-1) * (|W| + G*fan_in + C) + the two counters
    assert sum(state[k].numel() for k in hist) == h * (c * fan_in + fan_in + c) + 2


def test_earlier_layout_with_stored_weights_continues_exactly():
    """A checkpoint that also holds hist_weight / hist_mean (not needed) loads strictly and the
    run continues bit-exactly."""
    xs = _inputs(6, (2, 4, 8, 8))
    a = _pair_k(k=3)
    for x in xs[:3]:
        _step(a, x, torch.ones(2, 6, 8, 8, dtype=D))
    state = copy.deepcopy(a.state_dict())
    state["cbn.hist_weight"] = torch.randn(2, 6, 36, dtype=D)
    state["cbn.hist_mean"] = torch.randn(2, 6, dtype=D)
    b = _pair_k(k=3, seed=5)
    b.load_state_dict(state)  # strict: nothing unexpected, nothing missing
    assert b.cbn._count == 2 and b.cbn.iteration == 3
    for i, x in enumerate(xs[3:]):
        g = torch.randn(2, 6, 8, 8, generator=torch.Generator().manual_seed(i), dtype=D)
        oa, xa, ga = _step(a, x, g)
        ob, xb, gb = _step(b, x, g)
        assert torch.equal(oa, ob) and torch.equal(xa, xb)
        assert all(torch.equal(u, v) for u, v in zip(ga, gb))


def test_eval_is_affine_map_of_running_stats():
    pair, ref = _make(dict(k=3, padding=1), 3, 0)
    _compare(pair, ref, _inputs(4, (2, 4, 8, 8)))  # running stats == reference (window stats)
    pair.eval()
    x = _inputs(1, (3, 4, 8, 8), seed=5)[0]
    out = pair(x)
    c = pair.cbn
    y = pair.conv(x)
    s = (1, -1, 1, 1)
    expect = c.weight.view(s) * (y - c.running_mean.view(s)) / torch.sqrt(
        c.running_var.view(s) + c.eps
    ) + c.bias.view(s)
    _assert_close(out, expect, "eval output", 1e-12)
    assert c.iteration == 4
    # eval mode needs no conv
    lone = CrossIterationBatchNorm2d(6).to(D).eval()
    lone.load_state_dict(c.state_dict(), strict=False)
    _assert_close(lone(y), expect, "unbound eval output", 1e-12)


@pytest.mark.parametrize(
    "kwargs,key",
    [
        (dict(buffer_size=0), "D2NORM.CBN.BUFFER_SIZE"),
        (dict(buffer_size=3.0), "D2NORM.CBN.BUFFER_SIZE"),
        (dict(buffer_size=True), "D2NORM.CBN.BUFFER_SIZE"),
        (dict(burnin=-1), "D2NORM.CBN.BURNIN_ITERS"),
        (dict(burnin=2.5), "D2NORM.CBN.BURNIN_ITERS"),
        (dict(eps=0), "D2NORM.CBN.EPS"),
        (dict(momentum=1.5), "D2NORM.CBN.MOMENTUM"),
        (dict(grad_through_compensation=1), "D2NORM.CBN.GRAD_THROUGH_COMPENSATION"),
    ],
)
def test_bad_config(kwargs, key):
    with pytest.raises(ValueError) as err:
        CrossIterationBatchNorm2d(8, **kwargs)
    arg = next(iter(kwargs))
    assert arg in str(err.value) and key in str(err.value) and "Set " in str(err.value)


def test_unbound_layer_error():
    cbn = CrossIterationBatchNorm2d(6)
    with pytest.raises(RuntimeError, match=r"CrossIterationBatchNorm2d\(6.*prepare_model.*bind"):
        cbn(torch.randn(2, 6, 4, 4))
    cbn._d2norm_name = "backbone.res2.0.conv1.norm"
    with pytest.raises(RuntimeError, match=r"'backbone.res2.0.conv1.norm' is not bound.*prepare_model"):
        cbn(torch.randn(2, 6, 4, 4))


def test_bind_rules_and_no_module_recursion():
    conv = _conv(4, 6)
    cbn = CrossIterationBatchNorm2d(6).to(D)
    conv.norm = cbn  # detectron2 layout: the norm is a child of the conv
    cbn.prepare_preceding_conv(conv)
    cbn.bind(conv)  # idempotent
    assert sum(h.__name__ == "_stash_conv_input" for h in conv._forward_pre_hooks.values()) == 1
    assert [m for m in conv.modules()] == [conv, cbn]
    assert "norm.hist_grad_sqmean" in conv.state_dict()
    with pytest.raises(RuntimeError, match="already bound"):
        cbn.bind(_conv(4, 6))
    with pytest.raises(RuntimeError, match="already bound to another"):
        CrossIterationBatchNorm2d(6).bind(conv)
    with pytest.raises(ValueError, match="bias"):
        CrossIterationBatchNorm2d(6).bind(nn.Conv2d(4, 6, 3))
    with pytest.raises(ValueError, match="out_channels"):
        CrossIterationBatchNorm2d(5).bind(_conv(4, 6))
    # deepcopy re-targets the copy to the copied conv
    conv2 = copy.deepcopy(conv)
    assert conv2.norm.bound_conv is conv2 and cbn.bound_conv is conv
    x = _inputs(1, (2, 4, 8, 8))[0]
    for c in (conv, conv2):
        c.norm(c(x))
        c.norm(c(x))
    assert conv2.norm.iteration == 2 and cbn.iteration == 2
    assert "_d2norm_cbn_input" not in conv.__dict__  # the input is not kept


def test_channels_last_and_pickle():
    def run(channels_last):
        pair = _pair_k(k=3)
        if channels_last:
            pair = pair.to(memory_format=torch.channels_last)
        res = []
        for i, x in enumerate(_inputs(3, (2, 4, 8, 8))):
            g = torch.randn(2, 6, 8, 8, generator=torch.Generator().manual_seed(i), dtype=D)
            if channels_last:
                x, g = x.to(memory_format=torch.channels_last), g.to(memory_format=torch.channels_last)
            res += [t.contiguous() for t in [_step(pair, x, g)[0], _step(pair, x, g)[1]]]
        return pair, res

    pair, a = run(False)
    _, b = run(True)
    for u, v in zip(a, b):
        _assert_close(u, v, "channels_last vs contiguous", 1e-10)
    loaded = pickle.loads(pickle.dumps(pair))
    assert loaded.cbn.bound_conv is loaded.conv and loaded.cbn.iteration == pair.cbn.iteration
    x = _inputs(1, (2, 4, 8, 8), seed=9)[0]
    _assert_close(loaded(x), pair(x), "unpickled continuation", 0)


def test_empty_batch():
    pair = _pair_k(k=3)
    _step(pair, _inputs(1, (2, 4, 8, 8))[0], torch.ones(2, 6, 8, 8, dtype=D))
    before = {k: v.clone() for k, v in pair.state_dict().items()}
    x = torch.zeros(0, 4, 8, 8, dtype=D, requires_grad=True)
    out = pair(x)
    assert out.shape == (0, 6, 8, 8) and out.requires_grad
    out.sum().backward()
    assert x.grad.shape == x.shape and pair.cbn.weight.grad is not None
    assert pair.cbn.iteration == 1
    for k, v in pair.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_parametrized_conv_weight():
    class Standardize(nn.Module):  # weight standardization, as "GN+WS" installs it
        def forward(self, w):
            flat = w.flatten(1)
            return ((flat - flat.mean(1, keepdim=True)) / (flat.std(1, keepdim=True) + 1e-5)).view_as(w)

    pair, ref = _make(dict(k=3, padding=1), 3, 0)
    parametrize.register_parametrization(pair.conv, "weight", Standardize())
    parametrize.register_parametrization(ref.conv, "weight", Standardize())
    _compare(pair, ref, _inputs(5, (2, 4, 8, 8)))


def test_autocast_statistics_in_fp32():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
    fp32 = Pair(conv, CrossIterationBatchNorm2d(6))
    amp = copy.deepcopy(fp32)
    assert amp.cbn.bound_conv is amp.conv
    for x in _inputs(3, (2, 4, 8, 8)):
        x = x.float()
        ref = fp32(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = amp(x)
        assert out.dtype == torch.bfloat16
        out.float().sum().backward()
        _assert_close(out.float(), ref.detach(), "bf16 autocast vs fp32 output", 5e-2)
    assert amp.cbn.hist_grad_sqmean.dtype == torch.float32 and amp.cbn._count == 2
    for name in ("hist_sqmean", "hist_grad_sqmean", "hist_grad_mean"):
        a, b = getattr(amp.cbn, name), getattr(fp32.cbn, name)
        assert torch.allclose(a, b, rtol=2e-2, atol=2e-2), name  # fp32 statistics of a bf16 conv


def test_detectron2_conv_with_cbn_norm():
    import d2norm  # noqa: F401  (first: registers a detectron2._C stand-in if needed)

    from detectron2.layers import Conv2d

    cbn = CrossIterationBatchNorm2d(6, buffer_size=3).to(D)
    conv = Conv2d(4, 6, 3, stride=2, padding=1, bias=False, norm=cbn).to(D)
    torch.manual_seed(0)
    nn.init.normal_(conv.weight)
    cbn.prepare_preceding_conv(conv)
    ref = ReferenceConvCBN(nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False).to(D), 3, 0)
    with torch.no_grad():
        ref.conv.weight.copy_(conv.weight)
    assert list(conv.modules()) == [conv, cbn]
    for i, x in enumerate(_inputs(4, (2, 4, 9, 9))):
        g = torch.randn(2, 6, 5, 5, generator=torch.Generator().manual_seed(i), dtype=D)
        xq = x.clone().requires_grad_(True)
        out = conv(xq)
        (out * g).sum().backward()
        ob, xb, gb = _step(ref, x, g)
        _assert_close(out.detach(), ob, f"iter {i} out")
        _assert_close(xq.grad, xb, f"iter {i} x grad")
        _assert_close(conv.weight.grad, gb[0], f"iter {i} weight grad")
        with torch.no_grad():
            for p in (conv.weight, cbn.weight, cbn.bias):
                p -= LR * p.grad
                p.grad = None


@pytest.mark.parametrize(
    "conv_kw",
    [dict(k=3, padding=1), dict(k=3, stride=2, padding=2, dilation=2), dict(k=1, padding=0, groups=2)],
)
def test_sqmean_weight_gradient_matches_autograd(conv_kw):
    from d2norm.layers.cross_iteration_batch_norm import _conv_padding, sqmean_weight_gradient

    conv = _conv(4, 6, **conv_kw)
    x = _inputs(1, (2, 4, 9, 9))[0]
    y = conv(x)
    expect = torch.autograd.grad((y * y).mean((0, 2, 3)).sum(), conv.weight)[0]
    got = sqmean_weight_gradient(
        x, y.detach(), conv.weight.detach(), conv.stride, _conv_padding(conv), conv.dilation, conv.groups
    )
    _assert_close(got, expect, "dnu/dW", 1e-12)


def test_history_in_a_full_mask_rcnn_matches_autograd(data_root):
    """In the synthetic Mask R-CNN (CBN in backbone, FPN, box and mask heads; RoI batches of
    varying size), each layer's recorded pbar, dnu/dW and nu equal autograd's dmu/dW, dnu/dW and
    E[y^2] of its own conv on the input that conv really received (float64 recomputation)."""
    from helpers import synthetic_cfg

    from d2norm import build_model

    from detectron2.data import build_detection_train_loader
    from detectron2.utils.events import EventStorage

    cfg = synthetic_cfg("CBN", **{"D2NORM.DATA.ROOT": data_root, "D2NORM.CBN.BUFFER_SIZE": 3})
    torch.manual_seed(0)
    model = build_model(cfg).train()
    inputs = {}

    def keep_input(conv, args):
        inputs[conv] = args[0].detach().clone()

    convs = [m for m in model.modules() if isinstance(getattr(m, "norm", None), CrossIterationBatchNorm2d)]
    assert len(convs) > 30
    for conv in convs:
        conv.register_forward_pre_hook(keep_input)
    with EventStorage(0):
        model(next(iter(build_detection_train_loader(cfg))))
    heads = 0
    for conv in convs:
        cbn = conv.norm
        assert cbn._count == 1, cbn._d2norm_name
        x = inputs[conv].to(D)
        w = conv.weight.detach().to(D).requires_grad_(True)
        y = F.conv2d(x, w, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        mu, nu = y.mean((0, 2, 3)), (y * y).mean((0, 2, 3))
        dmu = torch.autograd.grad(mu.sum(), w, retain_graph=True)[0].flatten(1)
        dnu = torch.autograd.grad(nu.sum(), w)[0].flatten(1)
        pbar = cbn.hist_grad_mean[0].to(D).repeat_interleave(w.shape[0] // conv.groups, 0)
        for got, want, what in (
            (pbar, dmu, "pbar"),
            (cbn.hist_grad_sqmean[0].to(D), dnu, "dnu/dW"),
            (cbn.hist_sqmean[0].to(D), nu.detach(), "nu"),
        ):
            err = ((got - want).abs().max() / want.abs().max()).item()
            assert err < 1e-4, f"{cbn._d2norm_name} {what}: relative error {err:.1e}"
        heads += cbn._d2norm_name.startswith("roi_heads")
    assert heads == 6  # 4 box-head convs, 2 mask-head convs
