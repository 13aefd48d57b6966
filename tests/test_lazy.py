"""LazyConfig: the lazy and yacs versions of a recipe build the same model and train the same."""

import copy
import functools
import os
import types

import pytest
import torch
from helpers import CONFIGS, sgd_losses
from omegaconf import ListConfig

import d2norm
from d2norm import lazy, model_zoo

from detectron2.config import LazyConfig, instantiate

LAZY_GN = os.path.join(CONFIGS, "lazy", "synthetic", "mask_rcnn_R_18_FPN_GN.py")


def test_lazy_and_yacs_gn_recipe_build_and_train_the_same(data_root):
    from detectron2.data import DatasetCatalog, DatasetMapper

    cfg = model_zoo.get_config("synthetic/mask_rcnn_R_18_FPN_GN.yaml")
    lazy_model = instantiate(LazyConfig.load(LAZY_GN).model)
    yacs_model = d2norm.build_model(cfg)
    # the same modules with the same options (their printout) and parameter count
    assert repr(lazy_model) == repr(yacs_model)
    n = sum(p.numel() for p in yacs_model.parameters())
    assert sum(p.numel() for p in lazy_model.parameters()) == n > 0
    assert lazy.is_prepared(lazy_model)
    # the same first iterations from the same weights
    lazy_model.load_state_dict(yacs_model.state_dict())
    cfg.defrost()
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (96,), 96
    mapper = DatasetMapper(cfg, True)
    data = DatasetCatalog.get("d2norm_shapes_tiny_train")[:4]
    batches = [[mapper(copy.deepcopy(d)) for d in data[i : i + 2]] for i in (0, 2)]
    torch.manual_seed(5)
    a = sgd_losses(yacs_model, batches, lr=0.01, momentum=0.9)
    torch.manual_seed(5)
    b = sgd_losses(lazy_model, batches, lr=0.01, momentum=0.9)
    assert a == b and len(a) == 2


_LAZY_RECIPES = [
    "synthetic/mask_rcnn_R_18_FPN_GN",
    "synthetic/mask_rcnn_R_18_FPN_CBN",
    "synthetic/mask_rcnn_R_18_FPN_MABN",
    "synthetic/mask_rcnn_R_18_FPN_GN_WS",
    "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x",
    "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_syncbn",
    "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_gn",
    "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_gn_ws",
    "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_cbn",
    "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_2x_mabn",
]


_CODE = (type, types.FunctionType, types.MethodType, types.BuiltinFunctionType, functools.partial)


def _plain(value, depth=0):
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, (list, tuple, ListConfig)):
        return tuple(_plain(v, depth) for v in value)
    if hasattr(value, "__dict__") and not isinstance(value, _CODE) and depth < 2:  # Matcher, Box2BoxTransform
        return type(value).__name__, {k: _plain(v, depth + 1) for k, v in vars(value).items()}
    return type(value).__name__


def _attributes(model):
    """``{(module path, attribute): value}`` of the public non-tensor attributes of every module
    (lists, tuples and ListConfigs alike; numbers as floats)."""
    return {
        (path, k): _plain(v)
        for path, m in model.named_modules()
        for k, v in vars(m).items()
        if not k.startswith("_") and not isinstance(v, (torch.Tensor, torch.nn.Module))
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", _LAZY_RECIPES)
def test_lazy_recipe_builds_the_yacs_recipe_model(name):
    """Each LazyConfig recipe builds the model of its YAML twin: the same modules (printout), the
    same d2norm options on every layer, the same trainable / frozen parameters and input format."""
    from d2norm.norms import layer_options

    cfg = model_zoo.get_config(name + ".yaml")
    cfg.MODEL.DEVICE = "cpu"
    yacs_model = d2norm.build_model(cfg)
    lazy_model = instantiate(LazyConfig.load(model_zoo.get_config_file("lazy/" + name + ".py")).model)
    assert repr(lazy_model) == repr(yacs_model)
    a, b = dict(lazy_model.named_modules()), dict(yacs_model.named_modules())
    assert list(a) == list(b)
    assert [layer_options(a[k]) for k in a] == [layer_options(b[k]) for k in b]
    # every plain attribute of every module (score / NMS thresholds, top-k, anchors, features...)
    assert _attributes(lazy_model) == _attributes(yacs_model)
    grads = lambda m: [(k, p.requires_grad, tuple(p.shape)) for k, p in m.named_parameters()]  # noqa: E731
    assert grads(lazy_model) == grads(yacs_model)
    assert lazy_model.input_format == yacs_model.input_format == cfg.INPUT.FORMAT
    assert torch.equal(lazy_model.pixel_mean, yacs_model.pixel_mean)
    assert torch.equal(lazy_model.pixel_std, yacs_model.pixel_std)
    assert lazy.is_prepared(lazy_model)


def test_bound_norm_in_a_lazy_config_and_an_unprepared_model_is_refused():
    conf = LazyConfig.load(LAZY_GN)
    conf.model.model.backbone.norm = d2norm.norm("CBN", buffer_size=3)
    model = instantiate(conf.model)
    fpn_norms = [m for n, m in model.named_modules() if n.startswith("backbone.fpn_") and n.endswith("norm")]
    assert fpn_norms and all(type(m).__name__ == "CrossIterationBatchNorm2d" for m in fpn_norms)
    assert {m.buffer_size for m in fpn_norms} == {3}
    raw = instantiate(conf.model.model)  # the model without d2norm.lazy.prepared
    with pytest.raises(
        RuntimeError, match=r"skipped d2norm's model-preparation pass.*d2norm\.lazy\.prepared"
    ):
        lazy.check_prepared(raw)
    assert lazy.check_prepared(model) is model
