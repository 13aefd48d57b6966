"""BCN / BCN+WS against a float64 reference written from the paper
(d2norm/testing/bcn_reference.py): forward, gradients, estimates over several steps, both
modes; empty batches, channels_last, options and their errors, frozen form, folding, state
through a checkpoint, weight decay, TorchScript."""

import copy
import io

import pytest
import torch
from helpers import synthetic_cfg
from torch import nn
from torch.nn.utils import parametrize

import d2norm
from d2norm.deploy import fold
from d2norm.layers import BatchChannelNorm2d, BatchChannelNormWS, BCNBatchNorm2d, GroupNormWS
from d2norm.layers.weight_transforms import get_weight_transform
from d2norm.norms import norm_from_config
from d2norm.optim import get_param_groups
from d2norm.testing.bcn_reference import BCNReference

from detectron2.layers import Conv2d, FrozenBatchNorm2d, get_norm

F64 = torch.float64
C, G = 8, 4


def _x(step, gen, shape=(2, C, 5, 4), dtype=F64):
    # per-step, per-channel mean and scale that move: the estimates lag the batch statistics
    scale = 0.5 + 2.0 * torch.rand(1, shape[1], 1, 1, generator=gen, dtype=F64) * (1 + step % 3)
    shift = 2.0 * torch.randn(1, shape[1], 1, 1, generator=gen, dtype=F64) + step
    return (torch.randn(shape, generator=gen, dtype=F64) * scale + shift).to(dtype)


def _layer_and_reference(mode, schedule, affine, dtype, r=0.3, eps=1e-5, gen=None):
    layer = BatchChannelNorm2d(C, G, eps=eps, mode=mode, moving_speed=r, schedule=schedule, affine=affine)
    with torch.no_grad():
        for p in (layer.bn.weight, layer.weight):
            p.copy_(torch.rand(p.shape, generator=gen, dtype=F64) + 0.5)
        for p in (layer.bn.bias, layer.bias):
            p.copy_(torch.randn(p.shape, generator=gen, dtype=F64))
    layer = layer.to(dtype)
    ref = BCNReference(C, G, eps, mode, r, schedule, affine)
    params = {
        "gamma_b": layer.bn.weight.detach().to(F64).requires_grad_(),
        "beta_b": layer.bn.bias.detach().to(F64).requires_grad_(),
        "gamma_c": layer.weight.detach().to(F64).requires_grad_(),
        "beta_c": layer.bias.detach().to(F64).requires_grad_(),
    }
    return layer, ref, params


def _run_against_reference(mode, schedule, affine, dtype, steps=5):
    """Max abs difference (over ``steps`` training steps and one eval step) of output, gradients
    and estimates between the layer in ``dtype`` and the float64 reference."""
    gen = torch.Generator().manual_seed(0)
    layer, ref, params = _layer_and_reference(mode, schedule, affine, dtype, gen=gen)
    pairs = {
        "gamma_b": layer.bn.weight,
        "beta_b": layer.bn.bias,
        "gamma_c": layer.weight,
        "beta_c": layer.bias,
    }
    diff = {k: 0.0 for k in ("out", "grad_x", "grad_params", "running", "eval")}

    def d(a, b):
        return (a.detach().to(F64) - b.detach().to(F64)).abs().max().item()

    for step in range(steps):
        x64 = _x(step, gen)
        g = torch.randn(x64.shape, generator=gen, dtype=F64)
        x = x64.clone().to(dtype).requires_grad_()
        layer.zero_grad()
        y = layer(x)
        (y * g.to(dtype)).sum().backward()
        xr = x64.clone().requires_grad_()
        for p in params.values():
            p.grad = None
        yr = ref.step(xr, params)
        (yr * g).sum().backward()
        diff["out"] = max(diff["out"], d(y, yr))
        diff["grad_x"] = max(diff["grad_x"], d(x.grad, xr.grad))
        diff["grad_params"] = max(diff["grad_params"], *(d(pairs[k].grad, params[k].grad) for k in pairs))
        diff["running"] = max(
            diff["running"], d(layer.bn.running_mean, ref.mean), d(layer.bn.running_var, ref.var)
        )
        assert int(layer.bn.num_batches_tracked) == ref.t == step + 1
    layer.eval()
    x64 = _x(steps, gen)
    with torch.no_grad():
        diff["eval"] = d(layer(x64.to(dtype)), ref.step(x64, params, training=False))
    return diff


@pytest.mark.parametrize("affine", ["group", "channel"])
@pytest.mark.parametrize("schedule", ["cumulative", "constant"])
@pytest.mark.parametrize("mode", ["estimate", "batch"])
def test_matches_the_float64_reference(mode, schedule, affine):
    diff = _run_against_reference(mode, schedule, affine, F64)
    assert max(diff.values()) < 1e-9, diff


@pytest.mark.parametrize("mode", ["estimate", "batch"])
def test_float32_layer_matches_the_float64_reference(mode):
    diff = _run_against_reference(mode, "cumulative", "group", torch.float32)
    tol = {"out": 2e-5, "grad_x": 2e-5, "grad_params": 1e-4, "running": 2e-5, "eval": 2e-5}
    assert all(diff[k] < tol[k] for k in diff), diff


def test_estimate_mode_gives_no_gradient_through_the_estimates():
    """In "estimate" mode ∂y/∂x of the batch part is γ_b/√(σ̂²+ε): a sum of outputs of one channel
    has a constant gradient per channel (BN's gradient would sum to zero over the batch)."""
    layer = BatchChannelNorm2d(C, G).bn.double()
    x = _x(0, torch.Generator().manual_seed(3)).requires_grad_()
    layer(x).sum().backward()
    expected = layer.weight.detach() * torch.rsqrt(layer.running_var + layer.eps)
    torch.testing.assert_close(x.grad, expected.view(1, -1, 1, 1).expand_as(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "schedule, rates", [("cumulative", [1, 1 / 2, 1 / 3, 0.3, 0.3]), ("constant", [0.3] * 5)]
)
def test_moving_speed_schedule(schedule, rates):
    bn = BCNBatchNorm2d(C, moving_speed=0.3, schedule=schedule)
    seen = []
    for step in range(5):
        seen.append(bn.rate().item())
        bn(_x(step, torch.Generator().manual_seed(step)).float())
    assert seen == pytest.approx(rates)


@pytest.mark.parametrize("mode", ["estimate", "batch"])
def test_empty_batch(mode):
    layer = BatchChannelNorm2d(C, G, mode=mode)
    layer(_x(0, torch.Generator().manual_seed(0)).float())
    state = copy.deepcopy(layer.state_dict())
    x = torch.zeros(0, C, 5, 4, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape == x.shape
    assert all(p.grad is not None and not p.grad.any() for p in layer.parameters())
    for k, v in layer.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("mode", ["estimate", "batch"])
def test_channels_last(mode):
    a = BatchChannelNorm2d(C, G, mode=mode)
    b = copy.deepcopy(a)
    x = _x(0, torch.Generator().manual_seed(0)).float()
    xa = x.clone().requires_grad_()
    xb = x.clone().to(memory_format=torch.channels_last).requires_grad_()
    g = torch.randn_like(x)
    ya, yb = a(xa), b(xb)
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-5)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.bn.running_var, b.bn.running_var)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(num_groups=0), "D2NORM.BCN.NUM_GROUPS"),
        (dict(num_groups=3), "D2NORM.BCN.NUM_GROUPS"),  # does not divide 8
        (dict(eps=0.0), "D2NORM.BCN.EPS"),
        (dict(mode="ema"), "D2NORM.BCN.MODE"),
        (dict(moving_speed=0.0), "D2NORM.BCN.MOVING_SPEED"),
        (dict(moving_speed=1.5), "D2NORM.BCN.MOVING_SPEED"),
        (dict(moving_speed=True), "D2NORM.BCN.MOVING_SPEED"),
        (dict(schedule="linear"), "D2NORM.BCN.MOVING_SPEED_SCHEDULE"),
        (dict(affine="none"), "D2NORM.BCN.AFFINE"),
    ],
)
def test_bad_options_are_refused_with_the_key_and_the_fix(kwargs, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")) as e:
        BatchChannelNorm2d(C, **{"num_groups": G, **kwargs})
    assert "Fix:" in str(e.value)


@pytest.mark.parametrize("key, value", [("D2NORM.BCN.MODE", "micro"), ("D2NORM.WS.CONVENTION", "std")])
def test_bad_config_is_refused_when_the_model_is_built(key, value):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        d2norm.build_model(synthetic_cfg("BCN+WS", **{key: value}))


def test_names_build_the_layers_with_the_config_options():
    cfg = synthetic_cfg(
        "BCN",
        **{
            "D2NORM.BCN.NUM_GROUPS": 16,
            "D2NORM.BCN.EPS": 1e-4,
            "D2NORM.BCN.MODE": "batch",
            "D2NORM.BCN.MOVING_SPEED": 0.05,
            "D2NORM.BCN.MOVING_SPEED_SCHEDULE": "constant",
            "D2NORM.BCN.AFFINE": "channel",
            "D2NORM.WS.EPS": 1e-3,
            "D2NORM.WS.CONVENTION": "std_plus_eps",
        },
    )
    bcn, ws = get_norm(norm_from_config(cfg, "BCN"), 64), get_norm(norm_from_config(cfg, "BCN+WS"), 64)
    assert type(bcn) is BatchChannelNorm2d and type(ws) is BatchChannelNormWS
    for n in (bcn, ws):
        assert (n.num_groups, n.eps, n.affine, n.weight.numel()) == (16, 1e-4, "channel", 64)
        assert (n.bn.mode, n.bn.moving_speed, n.bn.schedule, n.bn.eps) == ("batch", 0.05, "constant", 1e-4)
    assert (ws.ws_eps, ws.ws_convention) == (1e-3, "std_plus_eps")
    d = get_norm("BCN", 64)  # outside a build: the defaults
    assert (d.num_groups, d.affine, d.bn.mode, d.bn.moving_speed, d.bn.schedule) == (
        32,
        "group",
        "estimate",
        0.1,
        "cumulative",
    )


def test_unprepared_bcn_ws_refuses_to_train():
    layer = get_norm("BCN+WS", 32)
    with pytest.raises(RuntimeError, match="prepare"):
        layer(torch.randn(2, 32, 3, 3))


def test_bcn_ws_model_standardizes_convs_as_gn_ws():
    """Every normalized conv of a "BCN+WS" Mask R-CNN carries the same Weight Standardization
    as in the "GN+WS" model (same parametrization, same ε and convention)."""
    torch.manual_seed(0)
    gn = d2norm.build_model(synthetic_cfg("GN+WS"))
    torch.manual_seed(0)
    bcn = d2norm.build_model(synthetic_cfg("BCN+WS"))
    gn_convs = {n: m for n, m in gn.named_modules() if isinstance(getattr(m, "norm", None), GroupNormWS)}
    bcn_convs = {
        n: m for n, m in bcn.named_modules() if isinstance(getattr(m, "norm", None), BatchChannelNormWS)
    }
    assert len(bcn_convs) == len(gn_convs) == 34  # R-18 20, FPN 8, box head 4, mask head 2
    for name, conv in bcn_convs.items():
        a, b = get_weight_transform(conv), get_weight_transform(gn_convs[name])
        assert type(a) is type(b) and vars(a) == vars(b), name
        torch.testing.assert_close(conv.weight, gn_convs[name].weight)  # the standardized weight


class _Net(nn.Module):
    """Two detectron2 Conv2d + BCN(+WS) blocks (the second grouped), prepared like a model."""

    def __init__(self, cls, mode="estimate"):
        super().__init__()
        self.a = Conv2d(3, 8, 3, padding=1, bias=False, norm=cls(8, 4, mode=mode), activation=torch.relu)
        self.b = Conv2d(8, 8, 3, padding=1, groups=2, bias=False, norm=cls(8, 2, mode=mode, affine="channel"))
        d2norm.prepare_model(self)

    def forward(self, x):
        return self.b(self.a(x))


def _trained_net(cls, mode="estimate", steps=3, dtype=F64):
    torch.manual_seed(0)
    net = _Net(cls, mode).to(dtype)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        x = torch.randn(2, 3, 6, 6, generator=gen, dtype=F64).to(dtype) * (step + 1) + step
        opt.zero_grad()
        net(x).square().mean().backward()
        opt.step()
    return net


@pytest.mark.parametrize("cls", [BatchChannelNorm2d, BatchChannelNormWS])
@pytest.mark.parametrize("mode", ["estimate", "batch"])
def test_fold_moves_the_batch_part_into_the_conv(cls, mode):
    net = _trained_net(cls, mode).eval()
    x = torch.randn(3, 3, 6, 6, dtype=F64) * 2 + 1
    with torch.no_grad():
        ref = net(x)
        folded = fold(copy.deepcopy(net))
        out = folded(x)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for conv in (folded.a, folded.b):
        assert isinstance(conv.norm, cls) and isinstance(conv.norm.bn, nn.Identity)
        assert not parametrize.is_parametrized(conv) and conv.bias is not None
    assert [t for _, t in folded.fold_report["folded"]] == [f"{cls.__name__} (batch part)"] * 2
    assert [t for _, t in folded.fold_report["kept"]] == [f"{cls.__name__} (channel part)"] * 2
    traced = torch.jit.trace(folded, x)  # the deployed form exports
    torch.testing.assert_close(traced(x), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cls", [BatchChannelNorm2d, BatchChannelNormWS])
def test_folded_model_exports_to_onnx(cls, tmp_path):
    """The deployed form (batch part folded into the conv, WS baked, channel part kept) exports to
    ONNX, and onnxruntime computes the eager model's output."""
    ort = pytest.importorskip("onnxruntime")
    net = _trained_net(cls, dtype=torch.float32).eval()
    x = torch.randn(3, 3, 6, 6) * 2 + 1
    with torch.no_grad():
        ref = net(x)
        folded = fold(copy.deepcopy(net))
    path = str(tmp_path / "bcn.onnx")
    torch.onnx.export(folded, (x,), path, opset_version=17, dynamo=False, input_names=["x"])
    (out,) = ort.InferenceSession(path).run(None, {"x": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), ref, rtol=1e-4, atol=1e-4)


def test_frozen_form_is_the_eval_map_in_training():
    """Frozen (parameters not trainable, then the preparation pass as after detectron2's freeze):
    the batch part becomes the FrozenBatchNorm2d of its eval map, the conv keeps WS, and the
    layer computes in training what it computed in eval, without updating anything."""
    net = _trained_net(BatchChannelNormWS).eval()
    x = torch.randn(2, 3, 6, 6, dtype=F64)
    with torch.no_grad():
        ref = net(x)
    for p in net.parameters():
        p.requires_grad_(False)
    d2norm.prepare_model(net)
    net.double()  # FrozenBatchNorm2d is built in float32
    for conv in (net.a, net.b):
        assert isinstance(conv.norm, BatchChannelNormWS) and type(conv.norm.bn) is FrozenBatchNorm2d
        assert get_weight_transform(conv) is not None
    net.train()
    with torch.no_grad():
        out = net(x)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_freeze_at_freezes_the_batch_part_of_frozen_stages():
    model = d2norm.build_model(synthetic_cfg("BCN+WS", **{"MODEL.BACKBONE.FREEZE_AT": 2}))
    bottom_up = model.backbone.bottom_up
    frozen = [m for m in bottom_up.stem.modules() if isinstance(m, BatchChannelNormWS)]
    frozen += [m for m in bottom_up.res2.modules() if isinstance(m, BatchChannelNormWS)]
    live = [m for m in bottom_up.res3.modules() if isinstance(m, BatchChannelNormWS)]
    assert len(frozen) == 5 and live
    assert all(type(m.bn) is FrozenBatchNorm2d and not m.weight.requires_grad for m in frozen)
    assert all(type(m.bn) is BCNBatchNorm2d and m.weight.requires_grad for m in live)


@pytest.mark.parametrize("mode", ["estimate", "batch"])
def test_state_resumes_exactly_from_a_checkpoint(mode):
    """Estimates and the schedule's step count go through a saved state dict: 3 + 3 steps from a
    checkpoint equal 6 uninterrupted steps, bit for bit."""
    gen = torch.Generator().manual_seed(0)
    xs = [_x(s, gen).float() for s in range(6)]

    def train(layer, steps):
        opt = torch.optim.SGD(layer.parameters(), lr=0.1)
        for x in steps:
            opt.zero_grad()
            layer(x).square().mean().backward()
            opt.step()
        return layer

    torch.manual_seed(0)
    full = train(BatchChannelNorm2d(C, G, mode=mode, moving_speed=0.2), xs)
    torch.manual_seed(0)
    half = train(BatchChannelNorm2d(C, G, mode=mode, moving_speed=0.2), xs[:3])
    buf = io.BytesIO()
    torch.save(half.state_dict(), buf)
    buf.seek(0)
    resumed = BatchChannelNorm2d(C, G, mode=mode, moving_speed=0.2)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert int(resumed.bn.num_batches_tracked) == 3 and resumed.bn.rate().item() == pytest.approx(0.25)
    train(resumed, xs[3:])
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_norm_parameters_get_weight_decay_norm():
    model = d2norm.build_model(synthetic_cfg("BCN+WS"))
    groups = get_param_groups(model, base_lr=0.01, weight_decay=1e-4, weight_decay_norm=0.0)
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    bcn = [m for m in model.modules() if isinstance(m, BatchChannelNormWS)]
    assert len(bcn) == 34
    for m in bcn:
        for p in (m.weight, m.bias, m.bn.weight, m.bn.bias):
            assert decay[id(p)] == 0.0
    convs = [
        m.parametrizations.weight.original
        for m in model.modules()
        if parametrize.is_parametrized(m, "weight")
    ]
    assert len(convs) == 34 and all(decay[id(p)] == 1e-4 for p in convs)


@pytest.mark.parametrize("mode", ["estimate", "batch"])
def test_torchscript_matches_eager_in_training_and_eval(mode):
    eager = BatchChannelNorm2d(C, G, mode=mode, moving_speed=0.3)
    scripted = torch.jit.script(copy.deepcopy(eager))
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        x = _x(step, gen).float()
        torch.testing.assert_close(scripted(x), eager(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(scripted.bn.running_var, eager.bn.running_var)
    assert int(scripted.bn.num_batches_tracked) == 3
    eager.eval()
    scripted.eval()
    x = _x(3, gen).float()
    torch.testing.assert_close(scripted(x), eager(x), rtol=1e-6, atol=1e-6)


def test_ws_convention_of_the_bcn_authors_weights():
    """ "sqrt_unbiased_var": per output channel (W − mean)/√(var_unbiased + ε), written out."""
    from d2norm.layers.weight_transforms import standardize_weight

    w = torch.randn(6, 4, 3, 3, dtype=F64) * 0.05 + 0.01
    eps = 1e-5
    expected = torch.stack(
        [(k - k.mean()) / ((((k - k.mean()) ** 2).sum() / (k.numel() - 1)) + eps).sqrt() for k in w]
    )
    torch.testing.assert_close(
        standardize_weight(w, eps, "sqrt_unbiased_var"), expected, rtol=1e-12, atol=1e-12
    )


def test_bcn_authors_imagenet_layout_loads(tmp_path):
    """A torchvision-style file in the BCN authors' layout (``bn1.pbn.*`` batch part, ``bn1.weight``
    of shape (1, G, 1)) loads into a BCN+WS model: every tensor where it belongs."""
    import torchvision

    from d2norm.checkpoint import load_pretrained_backbone

    gen = torch.Generator().manual_seed(0)
    sd = {}
    for key, value in torchvision.models.resnet18().state_dict().items():
        if key.endswith("num_batches_tracked") or key.startswith("fc."):
            continue
        head, leaf = key.rsplit(".", 1)
        if value.dim() == 1:  # a BN of torchvision: the authors' BCN in its place
            sd[f"{head}.pbn.{leaf}"] = torch.rand(value.shape, generator=gen) + 0.5
            if leaf in ("weight", "bias"):
                sd[f"{head}.{leaf}"] = torch.rand(1, 32, 1, generator=gen) + 0.5
        else:
            sd[key] = torch.randn(value.shape, generator=gen)
    path = tmp_path / "rn18_bcn_ws.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    model = d2norm.build_model(synthetic_cfg("BCN+WS"))
    load_pretrained_backbone(model, str(path))
    bu = model.backbone.bottom_up
    pairs = {
        "bn1": bu.stem.conv1,
        "layer1.0.bn1": bu.res2[0].conv1,
        "layer2.0.bn2": bu.res3[0].conv2,
        "layer3.0.downsample.1": bu.res4[0].shortcut,
    }
    for prefix, conv in pairs.items():
        norm = conv.norm
        assert torch.equal(norm.bn.running_var, sd[f"{prefix}.pbn.running_var"])
        assert torch.equal(norm.bn.weight.detach(), sd[f"{prefix}.pbn.weight"])
        assert torch.equal(norm.weight.detach(), sd[f"{prefix}.weight"].reshape(-1))
        assert torch.equal(norm.bias.detach(), sd[f"{prefix}.bias"].reshape(-1))
    assert torch.equal(
        bu.res2[0].conv1.parametrizations.weight.original.detach(), sd["layer1.0.conv1.weight"]
    )
