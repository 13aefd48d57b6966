"""FrozenStatsBN (frozen statistics, trainable affine) against torch's BatchNorm2d in eval mode,
its γ/β gradients against float64 math, and what the rest of the stack makes of it: the norm
name, detectron2's freezing and optimizer, Precise BN, and folding into the conv."""

import copy

import pytest
import torch
from torch import nn

import d2norm  # noqa: F401  (before detectron2: the _C stand-in)
from d2norm.deploy import fold
from d2norm.layers import FrozenStatisticsBatchNorm2d
from d2norm.norms import build_norm

from detectron2.layers import Conv2d, FrozenBatchNorm2d

F64 = torch.float64


def _layer(c=5, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    m = FrozenStatisticsBatchNorm2d(c).to(dtype)
    with torch.no_grad():
        m.weight.copy_(torch.rand(c, generator=gen) * 1.5 + 0.25)
        m.bias.copy_(torch.randn(c, generator=gen))
        m.running_mean.copy_(torch.randn(c, generator=gen) * 2)
        m.running_var.copy_(torch.rand(c, generator=gen) * 3 + 0.1)
    return m


def _reference_bn(m):
    """torch's own BatchNorm2d with the same parameters and statistics, in eval mode."""
    ref = nn.BatchNorm2d(m.num_features, eps=m.eps).to(m.weight.dtype)
    ref.load_state_dict(m.state_dict())
    return ref.eval()


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_output_equals_torch_batchnorm_in_eval_mode(mode):
    m = _layer()
    m.train(mode == "train")
    x = torch.randn(3, 5, 7, 6) * 4 + 1
    ref = _reference_bn(m)
    torch.testing.assert_close(m(x), ref(x), rtol=0, atol=1e-6)


def test_training_never_changes_the_statistics():
    m = _layer().train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    for _ in range(3):
        m(torch.randn(2, 5, 4, 4) * 10 + 3).sum().backward()
    for k, v in m.state_dict().items():
        if k not in ("weight", "bias"):
            assert torch.equal(v, before[k]), k


def test_affine_gradients_against_float64_math():
    m = _layer(dtype=F64).train()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 4, 3, generator=gen, dtype=F64, requires_grad=True)
    g = torch.randn(2, 5, 4, 3, generator=gen, dtype=F64)
    (m(x) * g).sum().backward()
    # the equations of the module docstring, written out per channel
    mean = m.running_mean.view(1, -1, 1, 1)
    inv_std = (m.running_var.view(1, -1, 1, 1) + m.eps).rsqrt()
    xhat = (x.detach() - mean) * inv_std
    torch.testing.assert_close(m.weight.grad, (g * xhat).sum(dim=(0, 2, 3)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.bias.grad, g.sum(dim=(0, 2, 3)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        x.grad, g * m.weight.detach().view(1, -1, 1, 1) * inv_std, rtol=1e-12, atol=1e-12
    )
    assert m.running_mean.grad is None and not m.running_var.requires_grad


def test_norm_name_builds_it_and_bn_weights_load():
    m = build_norm("FrozenStatsBN", 8)
    assert type(m) is FrozenStatisticsBatchNorm2d and m.num_features == 8
    src = nn.BatchNorm2d(8)
    with torch.no_grad():
        src.running_mean.uniform_(-1, 1)
        src.weight.uniform_(0.5, 1.5)
    m.load_state_dict(src.state_dict())
    assert torch.equal(m.running_mean, src.running_mean)


def test_detectron2_freezing_and_optimizer_treat_it_as_bn():
    from detectron2.solver.build import get_default_optimizer_params

    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), FrozenStatisticsBatchNorm2d(4))
    params = get_default_optimizer_params(model, base_lr=0.1, weight_decay=1e-4, weight_decay_norm=0.0)
    decay = {p: group["weight_decay"] for group in params for p in group["params"]}
    assert decay[model[1].weight] == decay[model[1].bias] == 0.0
    assert decay[model[0].weight] == 1e-4
    # a frozen stage: detectron2 turns it into FrozenBN with the same eval map
    m = _layer()
    frozen = FrozenBatchNorm2d.convert_frozen_batchnorm(copy.deepcopy(m))
    assert type(frozen) is FrozenBatchNorm2d
    x = torch.randn(2, 5, 3, 3)
    torch.testing.assert_close(frozen(x), m(x), rtol=1e-5, atol=1e-5)


def test_precise_bn_leaves_the_statistics_alone():
    from fvcore.nn.precise_bn import update_bn_stats

    m = _layer().train()
    before = m.running_mean.clone(), m.running_var.clone()
    update_bn_stats(m, [torch.randn(2, 5, 3, 3) * 5 + 2 for _ in range(3)], num_iters=3)
    assert torch.equal(m.running_mean, before[0]) and torch.equal(m.running_var, before[1])


def test_fold_into_conv_matches_the_unfolded_model():
    torch.manual_seed(0)
    conv = Conv2d(3, 5, 3, padding=1, bias=False, norm=_layer(dtype=F64)).to(F64)
    model = nn.Sequential(conv, nn.ReLU(), Conv2d(5, 5, 1, bias=True, norm=_layer(seed=2, dtype=F64)).to(F64))
    x = torch.randn(2, 3, 8, 8, dtype=F64)
    expected = model.eval()(x)
    folded = fold(copy.deepcopy(model))
    assert [t for _, t in folded.fold_report["folded"]] == ["FrozenStatisticsBatchNorm2d"] * 2
    assert all(m.norm is None for m in folded if isinstance(m, Conv2d))
    torch.testing.assert_close(folded(x), expected, rtol=1e-12, atol=1e-12)


def test_torchvision_weights_load_into_a_frozen_statistics_backbone(tmp_path):
    """The CBN paper's backbone: torchvision BN statistics land in FrozenStatsBN (trainable γ/β)
    from res3 on and in FrozenBN in the frozen stem + res2; a training step keeps them."""
    import torchvision
    from helpers import synthetic_cfg

    from d2norm.checkpoint import load_pretrained_backbone

    torch.manual_seed(0)
    tv = torchvision.models.resnet18()
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    path = str(tmp_path / "resnet18.pth")
    torch.save(tv.state_dict(), path)
    cfg = synthetic_cfg(
        "FrozenStatsBN",
        **{
            "MODEL.BACKBONE.FREEZE_AT": 2,
            "MODEL.FPN.NORM": "",
            "MODEL.ROI_BOX_HEAD.NORM": "",
            "MODEL.ROI_MASK_HEAD.NORM": "",
        },
    )
    model = d2norm.build_model(cfg)
    load_pretrained_backbone(model, path)
    bottom_up = model.backbone.bottom_up
    stem, res3 = bottom_up.stem.conv1.norm, bottom_up.res3[0].conv1.norm
    assert type(stem) is FrozenBatchNorm2d and type(res3) is FrozenStatisticsBatchNorm2d
    assert torch.equal(stem.running_mean, tv.bn1.running_mean)
    assert torch.equal(res3.running_var, tv.layer2[0].bn1.running_var)
    assert res3.weight.requires_grad and not res3.training
    model.train()
    assert not res3.training  # stays in eval mode, as mmdetection's norm_eval keeps it
    x = torch.randn(1, res3.num_features, 8, 8) * 3
    before = res3.running_mean.clone()
    res3(x).sum().backward()
    assert torch.equal(res3.running_mean, before) and res3.weight.grad is not None


def test_the_trainers_optimizer_gives_it_weight_decay_norm():
    from helpers import synthetic_cfg

    from d2norm.engine import Trainer

    cfg = synthetic_cfg(
        "FrozenStatsBN",
        **{"MODEL.FPN.NORM": "", "MODEL.ROI_BOX_HEAD.NORM": "", "MODEL.ROI_MASK_HEAD.NORM": ""},
    )
    cfg.SOLVER.WEIGHT_DECAY, cfg.SOLVER.WEIGHT_DECAY_NORM = 1e-4, 3e-5
    model = d2norm.build_model(cfg)
    decay = {
        id(p): g["weight_decay"]
        for g in Trainer.build_optimizer(cfg, model).param_groups
        for p in g["params"]
    }
    norms = [m for m in model.modules() if isinstance(m, FrozenStatisticsBatchNorm2d)]
    assert len(norms) > 10
    assert all(decay[id(m.weight)] == decay[id(m.bias)] == 3e-5 for m in norms)
    assert decay[id(model.backbone.bottom_up.stem.conv1.weight)] == 1e-4
