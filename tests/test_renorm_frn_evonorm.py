"""BRN, FRN + TLU and EvoNorm-S0 against float64 references written from the papers
(d2norm/testing/renorm_frn_evonorm_reference.py), their call-site preparation, folding,
checkpointed state and errors."""

import copy

import pytest
import torch
from torch import nn

import d2norm
from d2norm.layers import BatchRenorm2d, EvoNormS0, FilterResponseNorm2d
from d2norm.testing.renorm_frn_evonorm_reference import (
    BatchRenormReference,
    evonorm_s0,
    frn_tlu,
    ramp_limits,
)

F64 = torch.float64
SHAPE = (3, 4, 5, 6)


def _close(a, b, tol=1e-10):
    torch.testing.assert_close(a.detach().to(F64), b.detach().to(F64), rtol=tol, atol=tol)


def _x(step, gen, shape=SHAPE):
    # per-step and per-channel varying mean and scale: the batch statistics move around the
    # running ones, so r and d get clipped
    c = shape[1]
    scale = 0.3 + 2.0 * torch.rand(1, c, 1, 1, generator=gen, dtype=F64) * (1 + step % 3)
    shift = 3.0 * torch.randn(1, c, 1, 1, generator=gen, dtype=F64)
    return torch.randn(shape, generator=gen, dtype=F64) * scale + shift


# ----------------------------------------------------------------------------- BRN
BRN_KW = dict(r_max=1.5, d_max=0.5, ramp_start=2, r_max_end=9, d_max_end=6, momentum=0.3, eps=1e-5)


def _brn_pair(**kw):
    o = dict(BRN_KW, **kw)
    mod = BatchRenorm2d(SHAPE[1], **o).to(F64)
    ref = BatchRenormReference(
        SHAPE[1],
        o["r_max"],
        o["d_max"],
        o["ramp_start"],
        o["r_max_end"],
        o["d_max_end"],
        o["momentum"],
        o["eps"],
    )
    return mod, ref


def _brn_steps(mod, ref, steps, gen, lr=0.1):
    for _ in range(steps):
        x = _x(ref.t, gen)
        dy = torch.randn(x.shape, generator=gen, dtype=F64)
        xin = x.clone().requires_grad_()
        y = mod(xin)
        y.backward(dy)
        y_ref = ref.forward(x, mod.weight, mod.bias)
        dx_ref, dg_ref, db_ref = ref.backward(dy)
        _close(y, y_ref)
        _close(xin.grad, dx_ref)
        _close(mod.weight.grad, dg_ref)
        _close(mod.bias.grad, db_ref)
        _close(mod.running_mean, torch.tensor(ref.mu, dtype=F64))
        _close(mod.running_std, torch.tensor(ref.sigma, dtype=F64))
        assert int(mod.iters) == ref.t
        with torch.no_grad():  # SGD on gamma / beta
            mod.weight -= lr * mod.weight.grad
            mod.bias -= lr * mod.bias.grad
        mod.weight.grad = mod.bias.grad = None


def test_brn_matches_paper_reference_over_sgd_steps_through_the_ramp():
    mod, ref = _brn_pair()
    gen = torch.Generator().manual_seed(0)
    _brn_steps(mod, ref, 12, gen)  # plain BN (t < 2), the ramp (2..9), the full bounds
    assert ref.clipped_r > 0 and ref.clipped_d > 0  # the clipping was exercised
    # eval: the affine map of the running statistics
    mod.eval()
    x = _x(0, gen)
    _close(mod(x), ref.eval(x, mod.weight, mod.bias))


def test_brn_before_the_ramp_is_batch_norm():
    mod = BatchRenorm2d(SHAPE[1], ramp_start=10).to(F64)
    bn = nn.BatchNorm2d(SHAPE[1]).to(F64)
    x = _x(0, torch.Generator().manual_seed(1)).requires_grad_()
    y = mod(x)
    _close(y, bn(x))
    g_mod = torch.autograd.grad(y.square().sum(), x)[0]
    g_bn = torch.autograd.grad(bn(x).square().sum(), x)[0]
    _close(g_mod, g_bn)


@pytest.mark.parametrize(
    "t, expected",
    [
        (0, (1.0, 0.0)),
        (5000, (1.0, 0.0)),
        (22500, (2.0, 4.375)),
        (25000, (2 + 1 / 7, 5.0)),
        (40000, (3.0, 5.0)),
        (10**6, (3.0, 5.0)),
    ],
)
def test_brn_default_ramp_is_the_papers(t, expected):
    """Paper: r_max = 1, d_max = 0 for the first 5000 steps, r_max = 3 at 40k, d_max = 5 at 25k
    (values hand-computed for the linear relaxation)."""
    mod = BatchRenorm2d(4)
    mod.iters.fill_(t)
    r, d = mod.limits()
    assert r.item() == pytest.approx(expected[0]) and d.item() == pytest.approx(expected[1])
    assert (r.item(), d.item()) == pytest.approx(ramp_limits(t, 3.0, 5.0, 5000, 40000, 25000))


def test_brn_eval_and_empty_input_leave_the_state_alone():
    mod, ref = _brn_pair()
    _brn_steps(mod, ref, 3, torch.Generator().manual_seed(2))
    state = copy.deepcopy(mod.state_dict())
    mod.eval()
    mod(_x(0, torch.Generator().manual_seed(3)))
    mod.train()
    out = mod(torch.zeros(0, SHAPE[1], 5, 6, dtype=F64))
    assert out.shape == (0, SHAPE[1], 5, 6)
    for k, v in mod.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_brn_state_dict_resume_continues_exactly():
    mod, ref = _brn_pair()
    gen = torch.Generator().manual_seed(4)
    _brn_steps(mod, ref, 4, gen)
    assert set(mod.state_dict()) == {"weight", "bias", "running_mean", "running_std", "iters"}
    resumed = BatchRenorm2d(SHAPE[1], **BRN_KW).to(F64)
    resumed.load_state_dict(mod.state_dict())
    gen_a = torch.Generator().manual_seed(5)
    gen_b = torch.Generator().manual_seed(5)
    for _ in range(5):  # through the ramp
        xa, xb = _x(0, gen_a), _x(0, gen_b)
        assert torch.equal(mod(xa), resumed(xb))
    assert torch.equal(mod.running_std, resumed.running_std) and int(resumed.iters) == 9


def test_brn_folds_into_the_conv():
    from d2norm.deploy import eval_affine, fold

    from detectron2.layers import Conv2d

    torch.manual_seed(0)
    net = nn.Sequential(
        Conv2d(3, 4, 3, padding=1, bias=False, norm=BatchRenorm2d(4, **BRN_KW)),
        Conv2d(4, 4, 1, bias=True, norm=BatchRenorm2d(4, **BRN_KW)),
    ).to(F64)
    gen = torch.Generator().manual_seed(6)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for step in range(8):  # train so that gamma, beta and the running statistics move
        opt.zero_grad()
        net(_x(step, gen, (2, 3, 8, 8))).square().mean().backward()
        opt.step()
    net.eval()
    x = _x(0, gen, (2, 3, 8, 8))
    expected = net(x)
    norm = net[0].norm
    scale, shift = eval_affine(norm)
    _close(scale, norm.weight / norm.running_std)
    folded = fold(copy.deepcopy(net))
    assert all(m.norm is None for m in folded)
    assert [t for _, t in folded.fold_report["folded"]] == ["BatchRenorm2d"] * 2
    _close(folded(x), expected)


def test_frozen_brn_becomes_its_eval_map():
    from detectron2.layers import Conv2d, FrozenBatchNorm2d

    torch.manual_seed(0)
    conv = Conv2d(3, 4, 3, bias=False, norm=BatchRenorm2d(4, **BRN_KW))
    net = nn.Sequential(conv)
    gen = torch.Generator().manual_seed(7)
    for step in range(4):
        net(_x(step, gen, (2, 3, 8, 8)).float())
    with torch.no_grad():
        conv.norm.weight.mul_(1.5)
        conv.norm.bias.add_(0.2)
    net.eval()
    x = _x(0, gen, (2, 3, 8, 8)).float()
    expected = net(x)
    for p in conv.norm.parameters():
        p.requires_grad_(False)
    d2norm.prepare_model(net)
    assert type(conv.norm) is FrozenBatchNorm2d
    net.train()  # a frozen norm computes its eval map in training too
    torch.testing.assert_close(net(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kw, key",
    [
        (dict(r_max=0.5), "D2NORM.BRN.R_MAX"),
        (dict(d_max=-1.0), "D2NORM.BRN.D_MAX"),
        (dict(eps=0.0), "D2NORM.BRN.EPS"),
        (dict(momentum=0.0), "D2NORM.BRN.MOMENTUM"),
        (dict(ramp_start=100, r_max_end=50), "D2NORM.BRN.R_MAX_END_ITER"),
        (dict(d_max_end=-1), "D2NORM.BRN.D_MAX_END_ITER"),
    ],
)
def test_brn_bad_options(kw, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")) as e:
        BatchRenorm2d(8, **kw)
    assert "Fix" in str(e.value)


# ----------------------------------------------------------------------------- FRN
def _sgd_against(mod, ref_fn, params, steps, gen, shape=SHAPE, lr=0.1):
    """Train-mode steps; the module's output and every gradient against ``ref_fn`` (float64
    autograd of the reference expression on copies of the same parameters)."""
    for step in range(steps):
        x = _x(step, gen, shape)
        dy = torch.randn(x.shape, generator=gen, dtype=F64)
        xin = x.clone().requires_grad_()
        y = mod(xin)
        y.backward(dy)
        xr = x.clone().requires_grad_()
        pr = {k: getattr(mod, k).detach().clone().requires_grad_() for k in params}
        y_ref = ref_fn(xr, pr)
        y_ref.backward(dy)
        _close(y, y_ref)
        _close(xin.grad, xr.grad)
        for k in params:
            _close(getattr(mod, k).grad, pr[k].grad)
        with torch.no_grad():
            for k in params:
                p = getattr(mod, k)
                p -= lr * p.grad
                p.grad = None


@pytest.mark.parametrize("learnable_eps", [False, True])
def test_frn_matches_paper_reference_over_sgd_steps(learnable_eps):
    mod = FilterResponseNorm2d(SHAPE[1], eps=1e-6, learnable_eps=learnable_eps).to(F64)
    with torch.no_grad():  # thresholds on both sides of the normalized responses
        mod.tau.copy_(torch.tensor([-0.5, 0.0, 0.3, 1.0]))
        mod.bias.copy_(torch.tensor([0.1, -0.2, 0.0, 0.4]))
    params = ["weight", "bias", "tau"] + (["eps_learned"] if learnable_eps else [])

    def ref(x, p):
        return frn_tlu(x, p["weight"], p["bias"], p["tau"], 1e-6, p.get("eps_learned"))

    _sgd_against(mod, ref, params, 5, torch.Generator().manual_seed(10))
    if learnable_eps:
        assert not torch.equal(mod.eps_learned, torch.full((SHAPE[1],), 1e-4, dtype=F64))


def test_frn_learned_eps_dominates_small_responses():
    """ε = ε₀ + |ε_l|: a negative learned value counts by its magnitude."""
    mod = FilterResponseNorm2d(1, eps=1e-6, learnable_eps=True).to(F64).drop_activation()
    with torch.no_grad():
        mod.eps_learned.fill_(-0.25)
    x = torch.full((1, 1, 2, 2), 0.5, dtype=F64)  # ν² = 0.25
    _close(mod(x), x / (0.25 + 1e-6 + 0.25) ** 0.5)


def test_frn_without_tlu_and_batch_independence():
    gen = torch.Generator().manual_seed(11)
    mod = FilterResponseNorm2d(SHAPE[1]).to(F64)
    x = _x(0, gen)
    with torch.no_grad():
        mod.tau.fill_(-0.2)
        mod.bias.fill_(-0.1)
    full = mod(x)
    assert (full == -0.2).any()  # the TLU clamps somewhere
    for n in range(x.shape[0]):  # per sample: the same output alone as in the batch
        _close(mod(x[n : n + 1]), full[n : n + 1], 0)
    mod.eval()
    _close(mod(x), full, 0)  # eval = train
    mod.drop_activation().drop_activation()
    assert mod.tau is None and "tau" not in dict(mod.named_parameters())
    _close(mod(x), frn_tlu(x, mod.weight, mod.bias, None, mod.eps))


@pytest.mark.parametrize("learnable_eps, tlu", [(False, True), (True, True), (False, False)])
def test_frn_inference_path_equals_the_training_function_and_exports_to_onnx(learnable_eps, tlu, tmp_path):
    """Without autograd (inference, tracing, ONNX export) FRN runs out-of-place ops: bit for bit
    the training path's numbers (its autograd Function), and the ONNX export runs in onnxruntime
    with the paper reference's output."""
    from d2norm.layers.filter_response_norm import _FRNFunction

    gen = torch.Generator().manual_seed(12)
    mod = FilterResponseNorm2d(SHAPE[1], learnable_eps=learnable_eps)
    if not tlu:
        mod.drop_activation()
    with torch.no_grad():
        for p in mod.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    x = torch.randn(SHAPE, generator=gen) * 3
    trained = _FRNFunction.apply(x, mod.weight, mod.bias, mod.tau, mod.eps_learned, mod.eps)
    with torch.no_grad():
        inferred = mod(x)
    assert torch.equal(inferred, trained)
    opt = {
        n: getattr(mod, n).double() if getattr(mod, n) is not None else None for n in ("tau", "eps_learned")
    }
    reference = frn_tlu(
        x.double(), mod.weight.double(), mod.bias.double(), opt["tau"], mod.eps, opt["eps_learned"]
    )
    ort = pytest.importorskip("onnxruntime")
    path = str(tmp_path / "frn.onnx")
    torch.onnx.export(mod.eval(), (x,), path, opset_version=17, dynamo=False, input_names=["x"])
    (out,) = ort.InferenceSession(path).run(None, {"x": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out).double(), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kw, key",
    [
        (dict(eps=0.0), "D2NORM.FRN.EPS"),
        (dict(eps=-1e-6), "D2NORM.FRN.EPS"),
        (dict(learned_eps_init=-1.0), "D2NORM.FRN.LEARNED_EPS_INIT"),
    ],
)
def test_frn_bad_options(kw, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        FilterResponseNorm2d(8, **kw)


# ----------------------------------------------------------------------------- EvoNorm-S0
@pytest.mark.parametrize("groups, activation", [(2, True), (4, True), (1, False)])
def test_evonorm_matches_paper_reference_over_sgd_steps(groups, activation):
    mod = EvoNormS0(SHAPE[1], num_groups=groups, activation=activation).to(F64)
    with torch.no_grad():
        mod.weight.copy_(torch.tensor([1.0, 0.5, -0.7, 2.0]))
        if activation:
            mod.v.copy_(torch.tensor([1.0, -0.5, 2.0, 0.0]))
    params = ["weight", "bias"] + (["v"] if activation else [])

    def ref(x, p):
        return evonorm_s0(x, p["weight"], p["bias"], p.get("v"), groups, 1e-5)

    _sgd_against(mod, ref, params, 4, torch.Generator().manual_seed(12))


def test_evonorm_batch_independent_and_eval_equals_train():
    gen = torch.Generator().manual_seed(13)
    mod = EvoNormS0(8, num_groups=4).to(F64)
    x = _x(0, gen, (3, 8, 5, 5))
    full = mod(x)
    for n in range(3):
        _close(mod(x[n : n + 1]), full[n : n + 1], 0)
    mod.eval()
    _close(mod(x), full, 0)
    assert mod(torch.zeros(0, 8, 5, 5, dtype=F64)).shape == (0, 8, 5, 5)


def test_evonorm_bad_options():
    with pytest.raises(ValueError, match=r"D2NORM\.EVONORM\.NUM_GROUPS=32 does not divide the 48"):
        EvoNormS0(48)
    with pytest.raises(ValueError, match=r"D2NORM\.EVONORM\.EPS"):
        EvoNormS0(32, eps=0)
    with pytest.raises(ValueError, match=r"D2NORM\.EVONORM\.NUM_GROUPS must be a positive integer"):
        EvoNormS0(32, num_groups=0)
    # detectron2's RetinaNetHead builds get_norm(norm, 1) to read the type: a layer that refuses to run
    from detectron2.layers import get_norm

    probe = get_norm("EvoNorm-S0", 1)
    assert isinstance(probe, EvoNormS0)
    with pytest.raises(RuntimeError, match=r"NUM_GROUPS=32 groups cannot split the 1 channel"):
        probe(torch.zeros(1, 1, 2, 2))


# ----------------------------------------------------------------------------- in a model
def _cfg(norm, **overrides):
    from helpers import synthetic_cfg

    return synthetic_cfg(norm, **overrides)


@pytest.mark.parametrize(
    "name, cls", [("BRN", BatchRenorm2d), ("FRN", FilterResponseNorm2d), ("EvoNorm-S0", EvoNormS0)]
)
def test_name_builds_the_layer_with_config_options(name, cls):
    from detectron2.layers import get_norm

    overrides = {
        "BRN": {"D2NORM.BRN.R_MAX": 2.0, "D2NORM.BRN.RAMP_START_ITER": 7},
        "FRN": {"D2NORM.FRN.EPS": 1e-4, "D2NORM.FRN.LEARNABLE_EPS": True},
        "EvoNorm-S0": {"D2NORM.EVONORM.NUM_GROUPS": 16},
    }[name]
    model = d2norm.build_model(_cfg(name, **overrides))
    norms = [m.norm for m in model.modules() if isinstance(getattr(m, "norm", None), nn.Module)]
    assert len(norms) == 34 and all(type(n) is cls for n in norms)  # R-18 20, FPN 8, heads 4 + 2
    n = norms[0]
    if name == "BRN":
        assert (n.r_max, n.ramp_start, n.d_max) == (2.0, 7, 5.0)
    elif name == "FRN":
        assert n.eps == 1e-4 and n.eps_learned is not None
    else:
        assert n.num_groups == 16
    assert isinstance(get_norm(name, 64), cls)  # outside a build: the defaults


@pytest.mark.parametrize("name", ["FRN", "EvoNorm-S0"])
@pytest.mark.parametrize("replace_relu", [True, False])
def test_activation_placed_per_call_site(name, replace_relu):
    key = {"FRN": "D2NORM.FRN.REPLACE_RELU", "EvoNorm-S0": "D2NORM.EVONORM.REPLACE_RELU"}[name]
    model = d2norm.build_model(_cfg(name, **{key: replace_relu}))
    bu = model.backbone.bottom_up
    with_act = {"stem.conv1"} | {f"res{s}.{b}.conv1" for s in (2, 3, 4, 5) for b in (0, 1)}
    for n, conv in bu.named_modules():
        if isinstance(getattr(conv, "norm", None), nn.Module):
            assert conv.norm.activation == (n in with_act), n  # functional ReLU after conv1 stays
    for level in (2, 3, 4, 5):
        for kind in ("lateral", "output"):
            assert not getattr(model.backbone, f"fpn_{kind}{level}").norm.activation
    heads = list(model.roi_heads.box_head.conv_norm_relus) + list(model.roi_heads.mask_head.conv_norm_relus)
    for conv in heads:
        assert conv.norm.activation
        assert (conv.activation is None) == replace_relu
    # idempotent
    before = {k: v.shape for k, v in model.state_dict().items()}
    d2norm.prepare_model(model)
    assert {k: v.shape for k, v in model.state_dict().items()} == before
    assert all((c.activation is None) == replace_relu and c.norm.activation for c in heads)
    # a head conv computes exactly the norm's activation (negative values pass where τ < 0)
    conv = heads[0]
    with torch.no_grad():
        if name == "FRN":
            conv.norm.tau.fill_(-0.5)
        out = conv(torch.randn(2, 64, 7, 7))
    assert ((out < 0).any()) == replace_relu


def test_every_new_norm_trains_a_few_iterations_without_unused_parameters():
    """All parameters get gradients (DDP's find_unused_parameters=False needs it)."""
    from detectron2.structures import BitMasks, Boxes, Instances
    from detectron2.utils.events import EventStorage

    for name in ("FRN", "EvoNorm-S0"):
        torch.manual_seed(0)
        model = d2norm.build_model(_cfg(name))
        model.train()
        image = torch.randint(0, 255, (3, 96, 96), dtype=torch.uint8)
        inst = Instances((96, 96))
        inst.gt_boxes = Boxes(torch.tensor([[10.0, 10.0, 60.0, 50.0]]))
        inst.gt_classes = torch.tensor([1])
        mask = torch.zeros(1, 96, 96, dtype=torch.bool)
        mask[:, 10:50, 10:60] = True
        inst.gt_masks = BitMasks(mask)
        with EventStorage():
            losses = model([{"image": image, "instances": inst}])
        sum(losses.values()).backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert missing == [], missing
        if name == "FRN":  # τ = 0 before a functional ReLU gets no gradient (ReLU'(0) = 0)
            taus = {n: p.grad for n, p in model.named_parameters() if n.endswith("norm.tau")}
            backbone = [g for n, g in taus.items() if n.startswith("backbone.")]
            heads = [g for n, g in taus.items() if n.startswith("roi_heads.")]
            assert len(backbone) == 9 and all(torch.count_nonzero(g) == 0 for g in backbone)
            assert len(heads) == 6 and any(torch.count_nonzero(g) > 0 for g in heads)


@pytest.mark.parametrize("name", ["FRN", "EvoNorm-S0"])
def test_retinanet_head_relu_after_the_norm_is_replaced(name):
    """RetinaNet's head subnets are nn.Sequential(conv, norm, ReLU, ...): the ReLU goes, the
    norm keeps its activation, and the model trains."""
    from helpers import retinanet_cfg

    from detectron2.structures import Boxes, Instances
    from detectron2.utils.events import EventStorage

    cfg = retinanet_cfg(name)
    torch.manual_seed(0)
    model = d2norm.build_model(cfg)
    for subnet in (model.head.cls_subnet, model.head.bbox_subnet):
        mods = list(subnet)
        assert [type(m).__name__ for m in mods[1::3]] == [type(mods[1]).__name__] * 2
        assert all(m.activation for m in mods[1::3])
        assert all(type(m) is nn.Identity for m in mods[2::3])
    d2norm.prepare_model(model)  # idempotent
    assert all(type(m) is nn.Identity for m in list(model.head.cls_subnet)[2::3])
    inst = Instances((64, 64))
    inst.gt_boxes = Boxes(torch.tensor([[4.0, 6.0, 40.0, 50.0]]))
    inst.gt_classes = torch.tensor([1])
    model.train()
    with EventStorage(0):
        loss = sum(model([{"image": torch.rand(3, 64, 64) * 255, "instances": inst}]).values())
    loss.backward()
    assert torch.isfinite(loss)
