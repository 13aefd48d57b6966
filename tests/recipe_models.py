"""Shared by the recipe tests: loading a recipe's effective config, building its model once per
distinct architecture, and reading the norm of every call site of a built model."""

import contextlib
import functools
import glob
import os

import torch
from helpers import CONFIGS
from torch import nn

import d2norm

RECIPES = sorted(
    p for p in glob.glob(os.path.join(CONFIGS, "*", "*.yaml")) if not os.path.basename(p).startswith("Base-")
)
STAGES = ("stem", "res2", "res3", "res4", "res5")


def rel(path):
    return os.path.relpath(path, CONFIGS)


@functools.lru_cache(maxsize=None)
def _load_cached(path):
    from detectron2.config import get_cfg

    cfg = get_cfg()
    d2norm.add_d2norm_config(cfg)
    cfg.merge_from_file(path)
    cfg.freeze()
    return cfg


def load(path):
    """The recipe's effective config: get_cfg() + add_d2norm_config + merge_from_file (so
    ``_BASE_`` files are merged). A fresh mutable copy on every call."""
    if not os.path.isabs(path):
        path = os.path.join(CONFIGS, path)
    cfg = _load_cached(path).clone()
    cfg.defrost()
    return cfg


def header(path):
    """The recipe's leading comment block, as one string."""
    if not os.path.isabs(path):
        path = os.path.join(CONFIGS, path)
    lines = []
    for line in open(path):
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    return "\n".join(lines)


@contextlib.contextmanager
def structure_only_init():
    """The tests look at structure only: skip random init (most of the build time of an X-101)
    by making torch's in-place init functions no-ops while building."""
    names = [
        "uniform_",
        "normal_",
        "kaiming_uniform_",
        "kaiming_normal_",
        "xavier_uniform_",
        "xavier_normal_",
        "trunc_normal_",
    ]
    saved = {n: getattr(nn.init, n) for n in names}
    for n in names:
        setattr(nn.init, n, lambda tensor, *args, **kwargs: tensor)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(nn.init, n, fn)
        torch.set_num_threads(threads)


def structure_key(cfg):
    """Config fields that shape the model. Models are always built with a mask head, so a Faster
    R-CNN recipe is checked on the Mask R-CNN built from the same fields (the same model plus a
    mask head)."""
    model = cfg.MODEL.clone()
    for k in ("WEIGHTS", "PIXEL_MEAN", "PIXEL_STD", "DEVICE", "MASK_ON"):
        model.pop(k)
    return model.dump() + cfg.D2NORM.dump()


_MODELS = {}


def built_model(cfg):
    """The model of ``cfg`` (with a mask head), built on CPU without weights, once per
    :func:`structure_key`."""
    key = structure_key(cfg)
    if key not in _MODELS:
        cfg = cfg.clone()
        cfg.defrost()
        cfg.MODEL.DEVICE = "cpu"
        cfg.MODEL.WEIGHTS = ""
        cfg.MODEL.MASK_ON = True
        with structure_only_init():
            _MODELS[key] = d2norm.build_model(cfg)
    return _MODELS[key]


def detectron2_convs(module):
    from detectron2.layers import Conv2d

    return [m for m in module.modules() if isinstance(m, Conv2d)]


def call_sites(model):
    """``[(site, conv)]`` for every conv detectron2 builds with a norm argument in a ResNet-FPN
    R-CNN: ``stem`` / ``res2``..``res5`` (each conv of the bottom-up network), ``fpn`` (lateral and
    output convs), ``box_head`` and ``mask_head`` (their stacked convs)."""
    sites = []
    bottom_up = model.backbone.bottom_up
    for stage in STAGES:
        sites += [(stage, c) for c in detectron2_convs(getattr(bottom_up, stage))]
    for level in (2, 3, 4, 5):
        for kind in ("lateral", "output"):
            sites.append(("fpn", getattr(model.backbone, f"fpn_{kind}{level}")))
    sites += [("box_head", c) for c in model.roi_heads.box_head.conv_norm_relus]
    sites += [("mask_head", c) for c in model.roi_heads.mask_head.conv_norm_relus]
    return sites
