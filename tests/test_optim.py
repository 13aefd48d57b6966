"""The optimizer's parameter groups: every norm's gamma/beta get SOLVER.WEIGHT_DECAY_NORM.

The reference is detectron2's own ``get_default_optimizer_params`` on models whose norms it
knows (BN, GN), and the config values for the d2norm norms it does not know (CBN, MABN).
"""

import pytest
import torch
from helpers import synthetic_cfg
from torch import nn
from torch.nn.utils import parametrize

import d2norm
from d2norm.engine import Trainer
from d2norm.layers import CrossIterationBatchNorm2d, CycleNormList, MovingAverageBatchNorm2d
from d2norm.optim import get_param_groups


def _by_param(groups):
    """{id(param): settings}; each parameter must be in exactly one group."""
    out = {}
    for g in groups:
        settings = {k: v for k, v in g.items() if k != "params"}
        for p in g["params"]:
            assert id(p) not in out, "a parameter in two groups"
            out[id(p)] = settings
    return out


@pytest.mark.parametrize("name", ["BN", "GN"])
def test_groups_equal_detectron2_on_norms_it_knows(name):
    from detectron2.solver.build import get_default_optimizer_params

    model = d2norm.build_model(synthetic_cfg(name))
    kwargs = dict(base_lr=0.02, weight_decay_norm=0.0, bias_lr_factor=2.0, weight_decay_bias=1e-5)
    ours = _by_param(get_param_groups(model, **kwargs))
    theirs = _by_param(get_default_optimizer_params(model, **kwargs))
    assert ours == theirs
    assert len(ours) == len([p for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize("name", ["CBN", "MABN"])
def test_cbn_mabn_norm_parameters_get_weight_decay_norm(name):
    cfg = synthetic_cfg(name)
    cfg.SOLVER.WEIGHT_DECAY = 1e-4
    cfg.SOLVER.WEIGHT_DECAY_NORM = 0.0
    cfg.SOLVER.BIAS_LR_FACTOR = 1.0
    model = d2norm.build_model(cfg)
    opt = Trainer.build_optimizer(cfg, model)  # the trainer's optimizer, as training builds it
    settings = _by_param(opt.param_groups)
    types = (CrossIterationBatchNorm2d, MovingAverageBatchNorm2d)
    norms = [m for m in model.modules() if isinstance(m, types)]
    assert len(norms) > 10
    for m in norms:
        assert settings[id(m.weight)]["weight_decay"] == 0.0
        assert settings[id(m.bias)]["weight_decay"] == 0.0
    conv_weights = [
        m.parametrizations.weight.original if parametrize.is_parametrized(m, "weight") else m.weight
        for m in model.modules()
        if isinstance(m, nn.Conv2d)
    ]
    assert len(conv_weights) > 10
    assert all(settings[id(p)]["weight_decay"] == 1e-4 for p in conv_weights)
    assert all(s["lr"] == cfg.SOLVER.BASE_LR for s in settings.values())
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == cfg.SOLVER.MOMENTUM


def test_per_level_copies_and_shared_affine_count_once_as_norm_parameters():
    from detectron2.layers.batch_norm import CycleBatchNormList

    cbn = CycleNormList.of(CrossIterationBatchNorm2d(4), 3)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 1, bias=False), cbn, nn.Conv2d(4, 4, 1), CycleBatchNormList(3, num_features=4)
    )
    settings = _by_param(get_param_groups(net, base_lr=0.1, weight_decay=1e-4, weight_decay_norm=0.0))
    assert len(settings) == 2 + 1 + 2 + 2  # tied gamma/beta once; conv w; conv w, b; list's affine
    for p in (cbn[0].weight, cbn[2].bias, net[3].weight, net[3].bias):
        assert settings[id(p)]["weight_decay"] == 0.0
    assert settings[id(net[0].weight)]["weight_decay"] == 1e-4
