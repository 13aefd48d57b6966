"""The preparation pass: every norm that needs its conv gets it, wherever a norm follows a conv.

References are independent of d2norm: Weight Standardization / centralization recomputed per
output channel in float64 from the raw conv weight, a frozen BN's eval map in float64, counts of
training steps. Models: RetinaNet (norms in an nn.Sequential, applied once per FPN level), RegNet
(conv child then ``*_bn`` child), user modules, and the synthetic Mask R-CNN recipe.
"""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from helpers import retinanet_cfg, sgd_losses, synthetic_cfg
from torch import nn

import d2norm
from d2norm.layers import (
    BatchNormWS,
    BatchRenorm2d,
    CrossIterationBatchNorm2d,
    CycleNormList,
    GroupNormWS,
    MovingAverageBatchNorm2d,
    SyncBatchNorm2d,
)


def _ws64(w, eps=1e-5):
    """(W - mean) / sqrt(var_biased + eps) per output channel, float64."""
    w = w.detach().double().flatten(1)
    mean = w.mean(1, keepdim=True)
    var = ((w - mean) ** 2).mean(1, keepdim=True)
    return (w - mean) / torch.sqrt(var + eps)


def _center64(w):
    w = w.detach().double().flatten(1)
    return w - w.mean(1, keepdim=True)


def _raw_weight(conv):
    return conv.parametrizations.weight.original


def _get_norm(name, c):
    from detectron2.layers import get_norm

    return get_norm(name, c)


# ------------------------------------------------------------------ RetinaNet
LEVELS = 5  # P3-P7


def _batch(n=2, size=64):
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        inst = Instances((size, size))
        inst.gt_boxes = Boxes(torch.tensor([[4.0 + i, 6.0, 40.0, 50.0 - i]]))
        inst.gt_classes = torch.tensor([i % 3])
        out.append({"image": torch.rand(3, size, size, generator=g) * 255, "instances": inst})
    return out


def _train(model, steps):
    return sgd_losses(model, [_batch() for _ in range(steps)], lr=1e-3)


def _head_pairs(model):
    """(conv, norm) in the RetinaNet head subnets, by position: conv at 3i, norm at 3i+1."""
    pairs = []
    for subnet in (model.head.cls_subnet, model.head.bbox_subnet):
        mods = list(subnet)
        pairs += [(mods[i], mods[i + 1]) for i in range(0, len(mods), 3)]
    return pairs


@pytest.mark.parametrize("name", ["GN+WS", "CBN", "MABN"])
def test_retinanet_head_norms_are_prepared_and_train(name):
    torch.manual_seed(0)
    model = d2norm.build_model(retinanet_cfg(name))
    pairs = _head_pairs(model)
    assert len(pairs) == 4
    for conv, norm in pairs:
        if name == "GN+WS":  # stateless: one shared layer, WS on the conv
            assert isinstance(norm, GroupNormWS) and norm.num_groups == 32
            torch.testing.assert_close(
                conv.weight.detach().double().flatten(1), _ws64(_raw_weight(conv)), rtol=1e-5, atol=1e-6
            )
            continue
        # stateful: one copy per level, shared gamma/beta, the conv's zero bias removed
        assert isinstance(norm, CycleNormList) and len(norm) == LEVELS
        assert conv.bias is None
        assert all(c.weight is norm[0].weight and c.bias is norm[0].bias for c in norm)
        if name == "CBN":
            assert all(isinstance(c, CrossIterationBatchNorm2d) and c.bound_conv is conv for c in norm)
        else:
            assert all(isinstance(c, MovingAverageBatchNorm2d) for c in norm)
            torch.testing.assert_close(
                conv.weight.detach().double().flatten(1), _center64(_raw_weight(conv)), rtol=0, atol=1e-7
            )
    steps = 3
    losses = _train(model, steps)
    assert all(torch.isfinite(torch.tensor(losses)))
    for _conv, norm in pairs:
        if name == "GN+WS":
            continue
        # each level's state advanced once per step
        counts = [c.iteration if name == "CBN" else int(c.iters) for c in norm]
        assert counts == [steps] * LEVELS, counts
        # and the levels saw different inputs
        stats = [c.running_var for c in norm]
        assert not torch.equal(stats[0], stats[-1])
    # the weight transforms are still there and were trained through
    if name != "CBN":
        assert all(torch.nn.utils.parametrize.is_parametrized(conv, "weight") for conv, _ in pairs)


def test_retinanet_syncbn_is_d2norm_syncbn():
    from detectron2.layers.batch_norm import CycleBatchNormList

    model = d2norm.build_model(retinanet_cfg("SyncBN"))
    lists = [n for _, n in _head_pairs(model)]
    assert all(isinstance(n, CycleBatchNormList) and len(n) == LEVELS for n in lists)
    assert all(type(bn) is SyncBatchNorm2d for n in lists for bn in n)


def test_retinanet_gn_head_builds_with_the_configured_groups():
    """detectron2 v0.6's RetinaNetHead probes get_norm(norm, 1) for the layer type; a GN of 32
    groups cannot have 1 channel, which used to fail the build with a message about a key that
    cannot fix it."""
    cfg = retinanet_cfg("GN")
    model = d2norm.build_model(cfg)
    gns = [n for _, n in _head_pairs(model)]
    assert all(type(n).__name__ == "GroupNorm" and n.num_groups == 32 and n.num_channels == 64 for n in gns)


def test_gn_layer_with_fewer_channels_than_groups_refuses_with_a_true_message():
    probe = _get_norm("GN+WS", 1)  # what detectron2 v0.6's RetinaNetHead builds to read the type
    assert isinstance(probe, GroupNormWS)
    with pytest.raises(RuntimeError, match=r"NUM_GROUPS=32 groups cannot split the 1 channel"):
        probe(torch.randn(2, 1, 4, 4))
    net = nn.Sequential(nn.Conv2d(3, 16, 3, bias=False), _get_norm("GN", 16))  # 16 < 32 groups
    with pytest.raises(ValueError, match=r"'1' cannot be used: .*NUM_GROUPS=32 groups cannot split the 16"):
        d2norm.prepare_model(net)
    with pytest.raises(ValueError, match="does not divide the 48 channels"):  # 48 >= 32: unchanged
        _get_norm("GN", 48)


# ------------------------------------------------------------------ RegNet and user modules
def _regnet(norm, freeze_at=0):
    from detectron2.config import get_cfg
    from detectron2.modeling.backbone.regnet import RegNet, ResBottleneckBlock, SimpleStem

    cfg = get_cfg()
    d2norm.add_d2norm_config(cfg)
    cfg.D2NORM.GN.NUM_GROUPS = 8
    net = RegNet(
        stem_class=SimpleStem,
        stem_width=16,
        block_class=ResBottleneckBlock,
        depth=3,
        w_a=8,
        w_0=16,
        w_m=2,
        group_width=8,
        norm=d2norm.norms.norm_from_config(cfg, norm),
        out_features=["s1", "s2"],
        freeze_at=freeze_at,
    )
    return d2norm.prepare_model(net)


def _regnet_pairs(net):
    """(conv, norm) pairs of a RegNet by its naming: conv, bn (stem); proj, bn; a, a_bn; ..."""
    mods = dict(net.named_modules())
    pairs = []
    for path, m in mods.items():
        parent, _, leaf = path.rpartition(".")
        conv_leaf = {"bn": "conv" if parent.endswith("stem") else "proj"}.get(leaf)
        if leaf.endswith("_bn"):
            conv_leaf = leaf[:-3]
        if conv_leaf is not None:
            pairs.append((mods[f"{parent}.{conv_leaf}"], m))
    return pairs


@pytest.mark.parametrize("name", ["GN+WS", "MABN", "CBN"])
def test_regnet_blocks_are_prepared_and_train(name):
    torch.manual_seed(0)
    net = _regnet(name)
    pairs = _regnet_pairs(net)
    assert len(pairs) == 12
    for conv, norm in pairs:
        if name == "GN+WS":
            torch.testing.assert_close(
                conv.weight.detach().double().flatten(1), _ws64(_raw_weight(conv)), rtol=1e-5, atol=1e-6
            )
        elif name == "MABN":
            torch.testing.assert_close(
                conv.weight.detach().double().flatten(1), _center64(_raw_weight(conv)), rtol=0, atol=1e-7
            )
        else:
            assert norm.bound_conv is conv
    net.train()
    for _ in range(2):
        out = net(torch.randn(2, 3, 32, 32))
        sum(v.square().mean() for v in out.values()).backward()
    # the first-forward link checks passed and removed themselves
    assert not any(m._forward_hooks for m in net.modules())
    assert not any(m._forward_pre_hooks for m in net.modules() if not isinstance(m, nn.Conv2d))
    if name == "CBN":
        assert all(norm.iteration == 2 for _, norm in pairs)


def test_regnet_frozen_stages_keep_weight_standardization():
    from detectron2.layers import FrozenBatchNorm2d

    net = _regnet("BN+WS", freeze_at=2)  # stem and s1 frozen by RegNet.freeze
    frozen = [(c, n) for c, n in _regnet_pairs(net) if isinstance(n, FrozenBatchNorm2d)]
    live = [(c, n) for c, n in _regnet_pairs(net) if isinstance(n, BatchNormWS)]
    assert len(frozen) == 5 and len(live) == 7
    for conv, _ in frozen + live:
        torch.testing.assert_close(
            conv.weight.detach().double().flatten(1), _ws64(_raw_weight(conv)), rtol=1e-5, atol=1e-6
        )


class _ConvThenNorm(nn.Module):
    """A user module: its own conv, then get_norm, applied after the conv."""

    def __init__(self, name, c=32, wrong_input=False):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.norm = _get_norm(name, c)
        self.wrong_input = wrong_input

    def forward(self, x):
        y = self.conv(x)
        return self.norm(y * 2 if self.wrong_input else y)


class _NormWithoutConv(nn.Module):
    def __init__(self, name):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 32, 3, bias=False))
        self.pool = nn.Identity()
        self.norm = _get_norm(name, 32)

    def forward(self, x):
        return self.norm(self.pool(self.body(x)))


@pytest.mark.parametrize("name", ["GN+WS", "BN+WS", "MABN", "CBN"])
def test_user_module_conv_then_norm(name):
    torch.manual_seed(0)
    net = nn.Sequential(_ConvThenNorm(name), nn.ReLU())
    d2norm.prepare_model(net)
    conv = net[0].conv
    if name == "CBN":
        assert net[0].norm.bound_conv is conv
    else:
        ref = _center64(_raw_weight(conv)) if name == "MABN" else _ws64(_raw_weight(conv))
        torch.testing.assert_close(conv.weight.detach().double().flatten(1), ref, rtol=1e-5, atol=1e-6)
    x = torch.randn(2, 3, 8, 8)
    y = net(x)  # training: the link check passes
    # the layer normalizes the conv output: compare with the transform done by hand (float64)
    if name in ("GN+WS", "BN+WS"):
        w = _ws64(_raw_weight(conv)).view_as(conv.weight)
        z = F.conv2d(x.double(), w, padding=1)
        if name == "GN+WS":
            ref = F.relu(F.group_norm(z, 32, eps=1e-5))
        else:
            ref = F.relu(F.batch_norm(z, None, None, training=True, eps=1e-5))
        torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["GN+WS", "MABN", "CBN"])
def test_norm_applied_to_another_tensor_fails_at_the_first_training_forward(name):
    net = nn.Sequential(_ConvThenNorm(name, wrong_input=True))
    d2norm.prepare_model(net)
    with pytest.raises(
        RuntimeError,
        match=r"at '0.norm' was linked to the conv at '0.conv'.*not that "
        r"conv's output",
    ):
        net(torch.randn(2, 3, 8, 8))


@pytest.mark.parametrize("name", ["GN+WS", "BN+WS", "MABN", "CBN"])
def test_norm_without_a_feeding_conv_is_refused_with_its_path(name):
    with pytest.raises(ValueError, match=r"at '1.norm' needs .*finds no conv feeding it.*Fix:"):
        d2norm.prepare_model(nn.Sequential(nn.Identity(), _NormWithoutConv(name)))
    # norms that need nothing of the conv need no link
    d2norm.prepare_model(nn.Sequential(_NormWithoutConv("GN"), _NormWithoutConv("SyncBN")))


@pytest.mark.parametrize("name", ["GN+WS", "CBN"])
def test_link_check_survives_deepcopy_and_pickle(name):
    net = nn.Sequential(nn.Conv2d(3, 32, 3, bias=False), _get_norm(name, 32), nn.ReLU())
    d2norm.prepare_model(net)
    x = torch.randn(2, 3, 8, 8)
    copies = [copy.deepcopy(net)]
    if name == "CBN":  # torch pickles parametrized modules only through state_dict()
        copies.append(pickle.loads(pickle.dumps(net)))
    for other in copies:
        other(x)  # the copied check is bound to the copied conv
        assert other[1].__dict__.get("_d2norm_feeding_conv") is None and not other[0]._forward_hooks
    wrong = copy.deepcopy(net)
    with pytest.raises(RuntimeError, match="not that conv's output"):
        wrong[1](wrong[0](x) + 1)


def test_prepare_model_is_idempotent_on_retinanet():
    model = d2norm.build_model(retinanet_cfg("CBN"))
    before = {k: v.shape for k, v in model.state_dict().items()}
    d2norm.prepare_model(model)
    assert {k: v.shape for k, v in model.state_dict().items()} == before
    _train(model, 1)


# ------------------------------------------------------------------ detectron2's own build_model
@pytest.mark.parametrize("name", ["GN+WS", "BN+WS", "MABN", "CBN"])
def test_unprepared_model_refuses_to_train(name):
    """detectron2.modeling.build_model never runs the preparation pass: the first training forward
    must stop instead of training without WS / centralization / the CBN link."""
    from detectron2.modeling import build_model

    cfg = synthetic_cfg(name)
    x = torch.randn(2, 3, 32, 32)
    model = build_model(cfg)
    model.train()
    with pytest.raises(RuntimeError, match=r"d2norm\.build_model|d2norm\.prepare_model"):
        model.backbone.bottom_up.stem(x)
    model.eval()
    model.backbone.bottom_up.stem(x)  # eval needs no conv transform to run
    d2norm.prepare_model(model)
    model.train()
    model.backbone.bottom_up.stem(x)  # prepared: trains


# ------------------------------------------------------------------ frozen stages and freezing
def test_bn_ws_frozen_stages_keep_weight_standardization_float64():
    """FREEZE_AT 2 with BN+WS: the stem and res2 become FrozenBatchNorm2d after convs that still
    compute with standardized weights."""
    from detectron2.layers import FrozenBatchNorm2d

    cfg = synthetic_cfg("BN+WS")
    cfg.MODEL.BACKBONE.FREEZE_AT = 2
    model = d2norm.build_model(cfg)
    bottom_up = model.backbone.bottom_up
    stem = bottom_up.stem.conv1
    assert isinstance(stem.norm, FrozenBatchNorm2d)
    assert all(isinstance(b.conv1.norm, FrozenBatchNorm2d) for b in bottom_up.res2)
    assert isinstance(bottom_up.res3[0].conv1.norm, BatchNormWS)
    assert not any(p.requires_grad for p in bottom_up.stem.parameters())
    torch.manual_seed(1)
    with torch.no_grad():
        fbn = stem.norm
        fbn.weight.uniform_(0.5, 2)
        fbn.bias.uniform_(-1, 1)
        fbn.running_mean.uniform_(-0.5, 0.5)
        fbn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    y = stem(x)
    w = _ws64(_raw_weight(stem)).view_as(stem.weight)
    z = F.conv2d(x.double(), w, stride=2, padding=3)
    ref = (z - fbn.running_mean.double().view(1, -1, 1, 1)) / torch.sqrt(
        fbn.running_var.double().view(1, -1, 1, 1) + fbn.eps
    )
    ref = ref * fbn.weight.double().view(1, -1, 1, 1) + fbn.bias.double().view(1, -1, 1, 1)
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)
    # a plain "<conv>.weight" key still loads into the frozen, parametrized stem conv
    sd = {"weight": torch.randn_like(stem.weight)}
    missing, unexpected = stem.load_state_dict(sd, strict=False)
    assert "weight" not in unexpected
    torch.testing.assert_close(_raw_weight(stem), sd["weight"])


def _two_layer_net(name):
    from detectron2.layers import Conv2d

    c = 32
    return nn.Sequential(
        Conv2d(3, c, 3, padding=1, bias=False, norm=_get_norm(name, c)),
        nn.ReLU(),
        Conv2d(c, c, 3, padding=1, bias=False, norm=_get_norm(name, c)),
    )


@pytest.mark.parametrize("name", ["BN", "SyncBN", "BN+WS", "CBN", "MABN", "BRN"])
def test_convert_frozen_norms_every_norm(name):
    """Every norm becomes FrozenBatchNorm2d computing its eval map (float64 reference from the
    layer's statistics before freezing); WS / centralization stay on the convs."""
    from detectron2.layers import FrozenBatchNorm2d

    torch.manual_seed(0)
    net = d2norm.prepare_model(_two_layer_net(name))
    net.train()
    for _ in range(3):  # move the statistics away from their initial values
        net(torch.randn(4, 3, 6, 6) * 2 + 1)
    convs = [net[0], net[2]]
    with torch.no_grad():
        for conv in convs:
            conv.norm.weight.uniform_(0.5, 2)
            conv.norm.bias.uniform_(-1, 1)
    saved = []
    for conv in convs:
        n = conv.norm
        raw = _raw_weight(conv) if name in ("BN+WS", "MABN") else conv.weight
        mean = getattr(n, "running_mean", None)
        saved.append(
            (
                raw.detach().clone(),
                n.weight.detach().clone(),
                n.bias.detach().clone(),
                None if mean is None else mean.clone(),
                # BRN keeps the running sigma, eps included: var = sigma^2 with eps 0
                n.running_std.double().square()
                if name == "BRN"
                else n.running_var.detach().clone().flatten(),
                0.0 if name == "BRN" else n.eps,
            )
        )
    out = d2norm.convert_frozen_norms(net)
    assert out is net
    assert all(isinstance(c.norm, FrozenBatchNorm2d) for c in convs)
    assert not any(p.requires_grad for c in convs for p in c.norm.parameters())
    assert not any(
        isinstance(
            m,
            (CrossIterationBatchNorm2d, MovingAverageBatchNorm2d, nn.BatchNorm2d, BatchNormWS, BatchRenorm2d),
        )
        for m in net.modules()
    )

    x = torch.randn(2, 3, 6, 6)
    ref = x.double()
    for i, (raw, g, b, mean, var, eps) in enumerate(saved):
        if name == "BN+WS":
            w = _ws64(raw).view_as(raw)
        elif name == "MABN":
            w = _center64(raw).view_as(raw)
        else:
            w = raw.double()
        z = F.conv2d(ref, w, padding=1)
        m = torch.zeros_like(var.double()) if mean is None else mean.double()
        ref = (z - m.view(1, -1, 1, 1)) / torch.sqrt(var.double().view(1, -1, 1, 1) + eps)
        ref = ref * g.double().view(1, -1, 1, 1) + b.double().view(1, -1, 1, 1)
        if i == 0:
            ref = F.relu(ref)
    net.train()  # frozen: no batch statistics even in training mode
    torch.testing.assert_close(net(x).double(), ref, rtol=1e-4, atol=1e-5)
    if name == "CBN":  # the conv no longer hands its input to a CBN
        assert not convs[0]._forward_pre_hooks


def test_convert_frozen_norms_on_a_single_layer_like_detectron2():
    from detectron2.layers import FrozenBatchNorm2d

    cbn = CrossIterationBatchNorm2d(8)
    assert isinstance(d2norm.convert_frozen_norms(cbn), FrozenBatchNorm2d)
    gn = _get_norm("GN+WS", 32)
    assert d2norm.convert_frozen_norms(gn) is gn  # GN has no batch statistics: left as is
    with pytest.raises(ValueError, match="Cannot freeze a lone BatchNormWS.*Fix"):
        d2norm.convert_frozen_norms(_get_norm("BN+WS", 8))  # its conv would lose WS
