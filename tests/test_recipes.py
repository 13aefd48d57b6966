"""Every recipe under configs/ loads, and builds the model its file name promises.

The expected norm, model, backbone, schedule and scratch/fine-tune setting are read from the
recipe's *file name* (detectron2's naming: ``mask_rcnn_X_101_32x8d_FPN_3x_gn_ws.yaml``), then
checked against the merged config and against the modules of the built model at every call
site: backbone bottom-up (stem, res2-res5), FPN lateral/output convs, box head convs, mask head
convs. Models are built on CPU without weights; recipes that differ only in schedule, weights
file or pixel statistics share one build.
"""
import contextlib
import glob
import os
import re

import pytest
import torch
from torch import nn

from conftest import CONFIGS

import d2norm
from d2norm.layers import (
    BatchRenorm2d,
    CrossIterationBatchNorm2d,
    EvoNormS0,
    FilterResponseNorm2d,
    GroupNorm,
    GroupNormWS,
    SyncBatchNorm2d,
)
from d2norm.layers.moving_average_batch_norm import MovingAverageBatchNorm2d
from d2norm.layers.weight_transforms import (
    WeightCentralization,
    WeightStandardization,
    get_weight_transform,
)

RECIPES = sorted(
    p for p in glob.glob(os.path.join(CONFIGS, "*", "*.yaml"))
    if not os.path.basename(p).startswith("Base-")
)
COCO_DIRS = ("COCO-Detection", "COCO-InstanceSegmentation", "Misc")

_COCO_NAME = re.compile(
    r"^(?P<scratch>scratch_)?(?P<arch>mask|faster)_rcnn_(?P<bb>R_50|R_101|X_101_32x8d|X_50_32x4d|"
    r"X_101_32x4d)_FPN_(?P<sched>\d+x)(?:_(?P<norm>syncbn|gn_ws|gn|cbn|mabn|bn))?\.yaml$"
)
_SYNTH_NAME = re.compile(
    r"^mask_rcnn_R_18_FPN_(?P<norm>BN|CBN|GN|GN_WS|MABN|SyncBN|BRN|FRN|EvoNorm)\.yaml$")
_NORM_OF_SUFFIX = {None: "FrozenBN", "syncbn": "SyncBN", "gn": "GN", "gn_ws": "GN+WS",
                   "cbn": "CBN", "mabn": "MABN", "bn": "BN",
                   "BN": "BN", "CBN": "CBN", "GN": "GN", "GN_WS": "GN+WS", "MABN": "MABN",
                   "SyncBN": "SyncBN", "BRN": "BRN", "FRN": "FRN", "EvoNorm": "EvoNorm-S0"}
_BACKBONE = {"R_18": (18, 1, 64), "R_50": (50, 1, 64), "R_101": (101, 1, 64),
             "X_101_32x8d": (101, 32, 8), "X_50_32x4d": (50, 32, 4), "X_101_32x4d": (101, 32, 4)}
_NORM_TYPE = {"FrozenBN": None, "BN": nn.BatchNorm2d, "SyncBN": SyncBatchNorm2d, "GN": GroupNorm,
              "GN+WS": GroupNormWS, "CBN": CrossIterationBatchNorm2d,
              "MABN": MovingAverageBatchNorm2d, "BRN": BatchRenorm2d, "FRN": FilterResponseNorm2d,
              "EvoNorm-S0": EvoNormS0}
_BLOCKS_RES4 = {18: 2, 50: 6, 101: 23}


def _frozen_bn_type():
    from detectron2.layers import FrozenBatchNorm2d

    return FrozenBatchNorm2d


def _expected_from_name(path):
    """What the file name promises: dict(norm, mask, depth, groups, width, sched, scratch)."""
    name, folder = os.path.basename(path), os.path.basename(os.path.dirname(path))
    if folder == "synthetic":
        m = _SYNTH_NAME.match(name)
        assert m, f"{folder}/{name}: not a recipe name of the form mask_rcnn_R_18_FPN_<NORM>.yaml"
        return dict(norm=_NORM_OF_SUFFIX[m["norm"]], mask=True, backbone="R_18", sched=None,
                    scratch=True, coco=False)
    m = _COCO_NAME.match(name)
    assert m, f"{folder}/{name}: not a detectron2-style recipe name"
    return dict(norm=_NORM_OF_SUFFIX[m["norm"]], mask=m["arch"] == "mask", backbone=m["bb"],
                sched=m["sched"], scratch=bool(m["scratch"]), coco=True)


def _load(path):
    from detectron2.config import get_cfg

    cfg = get_cfg()
    d2norm.add_d2norm_config(cfg)
    cfg.merge_from_file(path)
    return cfg


def _rel(path):
    return os.path.relpath(path, CONFIGS)


# ----------------------------------------------------------------------------- config level
def test_recipe_set_is_complete():
    """One file per published row, and the norm x backbone x schedule grid of both models."""
    names = {_rel(p) for p in RECIPES}
    for must in [
        "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml",
        "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x_gn.yaml",
        "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x_syncbn.yaml",
        "COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_2x_gn.yaml",
        "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_cbn.yaml",
        "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_2x_mabn.yaml",
        "COCO-Detection/faster_rcnn_R_50_FPN_1x_gn_ws.yaml",
        "COCO-Detection/faster_rcnn_X_101_32x4d_FPN_1x_gn_ws.yaml",
        "COCO-Detection/faster_rcnn_X_50_32x4d_FPN_1x_gn_ws.yaml",
        "Misc/scratch_mask_rcnn_R_50_FPN_3x_gn.yaml",
        "Misc/scratch_mask_rcnn_R_50_FPN_9x_gn.yaml",
        "Misc/scratch_mask_rcnn_R_50_FPN_9x_syncbn.yaml",
        "Misc/scratch_mask_rcnn_R_50_FPN_2x_mabn.yaml",
    ]:
        assert must in names, must
    for arch, folder in (("mask", "COCO-InstanceSegmentation"), ("faster", "COCO-Detection")):
        for bb in ("R_50", "R_101", "X_101_32x8d"):
            for suffix, scheds in (("", "123"), ("_syncbn", "123"), ("_gn", "123"),
                                   ("_gn_ws", "1"), ("_cbn", "1"), ("_mabn", "2")):
                for s in scheds:
                    name = f"{folder}/{arch}_rcnn_{bb}_FPN_{s}x{suffix}.yaml"
                    assert name in names, name


@pytest.mark.parametrize("path", RECIPES, ids=_rel)
def test_recipe_config_matches_its_name(path):
    exp = _expected_from_name(path)
    cfg = _load(path)
    norm = exp["norm"]
    depth, groups, width = _BACKBONE[exp["backbone"]]
    M = cfg.MODEL
    assert M.META_ARCHITECTURE == "GeneralizedRCNN"
    assert M.BACKBONE.NAME == "build_resnet_fpn_backbone"
    assert M.MASK_ON == exp["mask"]
    assert (M.RESNETS.DEPTH, M.RESNETS.NUM_GROUPS) == (depth, groups)
    if groups > 1:
        assert M.RESNETS.WIDTH_PER_GROUP == width and M.RESNETS.STRIDE_IN_1X1 is False
    assert M.RESNETS.NORM == norm
    if norm == "FrozenBN":  # BN*: detectron2's baseline layout
        assert (M.FPN.NORM, M.ROI_BOX_HEAD.NORM, M.ROI_MASK_HEAD.NORM) == ("", "", "")
        assert M.BACKBONE.FREEZE_AT == 2
    else:
        assert M.FPN.NORM == M.ROI_BOX_HEAD.NORM == M.ROI_MASK_HEAD.NORM == norm
        if exp["coco"]:  # the published 4conv1fc head
            assert (M.ROI_BOX_HEAD.NUM_CONV, M.ROI_BOX_HEAD.NUM_FC) == (4, 1)
    if not exp["coco"]:
        return
    # schedule: 1x = 90k iterations at 16 images; 9x = 9 x 90k x 16 images
    k = int(exp["sched"][:-1])
    assert cfg.SOLVER.MAX_ITER * cfg.SOLVER.IMS_PER_BATCH == k * 90000 * 16
    assert all(s < cfg.SOLVER.MAX_ITER for s in cfg.SOLVER.STEPS)
    if exp["scratch"]:
        assert M.WEIGHTS == "" and M.BACKBONE.FREEZE_AT == 0
    else:
        assert M.WEIGHTS.startswith("pretrained/") and M.BACKBONE.FREEZE_AT == 2
        # input conventions follow the weights family
        torchvision_style = M.WEIGHTS.endswith(".pth")
        assert (cfg.INPUT.FORMAT == "RGB") == torchvision_style
        if torchvision_style or M.WEIGHTS.endswith("-GN.pkl") or groups > 1:
            assert M.RESNETS.STRIDE_IN_1X1 is False
        else:  # MSRA Caffe2 BN weights
            assert M.RESNETS.STRIDE_IN_1X1 is True and list(M.PIXEL_STD) == [1.0, 1.0, 1.0]
        if exp["backbone"] == "X_101_32x8d" and not torchvision_style:
            assert list(M.PIXEL_STD) == [57.375, 57.120, 58.395]
    if norm == "GN+WS":
        assert cfg.D2NORM.WS.CONVENTION == "std_plus_eps"  # WS-pretrained weights' convention
    if norm == "CBN":
        assert cfg.D2NORM.CBN.BUFFER_SIZE == 3
        assert cfg.D2NORM.CBN.BURNIN_ITERS == round(8 * 117266 / cfg.SOLVER.IMS_PER_BATCH)
    if norm == "MABN":  # simulated batch 16 / 2 images per GPU
        assert cfg.D2NORM.MABN.BUFFER_SIZE * 2 == 16 == cfg.SOLVER.IMS_PER_BATCH
    # the header cites the published number it targets (or says there is none)
    header = "".join(line for line in open(path) if line.startswith("#"))
    assert "Published target" in header
    assert re.search(r"\d\d\.\d box AP", header) or "none published" in header
    assert "Pretrained weights" in header or exp["scratch"]


# ----------------------------------------------------------------------------- built models
@contextlib.contextmanager
def _structure_only_init():
    """These tests look at structure only: skip random init (most of the build time of an
    X-101) by making torch's in-place init functions no-ops while building."""
    names = ["uniform_", "normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
             "xavier_normal_", "trunc_normal_"]
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


def _structure_key(cfg):
    """Config fields that shape the model, without the mask head: a Faster R-CNN recipe is
    checked on the Mask R-CNN built from the same fields (the same model plus a mask head)."""
    model = cfg.MODEL.clone()
    for k in ("WEIGHTS", "PIXEL_MEAN", "PIXEL_STD", "DEVICE", "MASK_ON", "ROI_MASK_HEAD"):
        model.pop(k)
    return model.dump() + cfg.D2NORM.dump()


def _detectron2_convs(module):
    from detectron2.layers import Conv2d

    return [m for m in module.modules() if isinstance(m, Conv2d)]


def _check_site(conv, expected_type, where):
    """Assert the norm of one call site; returns 1 if it carries a norm, else 0."""
    norm = getattr(conv, "norm", None)
    if expected_type is None:
        assert norm is None, f"{where}: expected no norm, got {type(norm).__name__}"
        return 0
    assert type(norm) is expected_type, (
        f"{where}: expected {expected_type.__name__}, got {type(norm).__name__}")
    return 1


def _check_model(cfg, model, exp):
    norm = exp["norm"]
    frozen_bn = _frozen_bn_type()
    site_type = frozen_bn if norm == "FrozenBN" else _NORM_TYPE[norm]
    head_type = None if norm == "FrozenBN" else site_type
    depth, groups, width = _BACKBONE[exp["backbone"]]
    freeze_at = cfg.MODEL.BACKBONE.FREEZE_AT

    # backbone bottom-up: stem and res2..res5; detectron2 turns BN-type norms of frozen stages
    # into FrozenBN
    bottom_up = model.backbone.bottom_up
    n_sites = 0
    for idx, stage in enumerate(["stem", "res2", "res3", "res4", "res5"], start=1):
        module = getattr(bottom_up, stage)
        frozen = freeze_at >= idx
        # (d2norm's preparation pass does the same for CBN / MABN)
        expected = frozen_bn if (frozen and norm in ("BN", "SyncBN", "CBN", "MABN", "BRN")) else site_type
        convs = _detectron2_convs(module)
        assert convs
        for conv in convs:
            n_sites += _check_site(conv, expected, f"{stage} conv")
        assert all(p.requires_grad != frozen for p in module.parameters()), stage
    assert len(bottom_up.res4) == _BLOCKS_RES4[depth]
    if depth >= 50:  # bottleneck blocks: groups and widths (ResNeXt: grouped 3x3 convs)
        for s, stage in enumerate(["res2", "res3", "res4", "res5"]):
            for block in getattr(bottom_up, stage):
                assert block.conv2.groups == groups
                assert block.conv2.out_channels == groups * width * 2 ** s
                assert block.conv2.weight.shape[1] == width * 2 ** s
        stride_in_1x1 = cfg.MODEL.RESNETS.STRIDE_IN_1X1
        assert bottom_up.res3[0].conv1.stride == ((2, 2) if stride_in_1x1 else (1, 1))
        assert bottom_up.res3[0].conv2.stride == ((1, 1) if stride_in_1x1 else (2, 2))

    # FPN lateral and output convs
    for level in (2, 3, 4, 5):
        for kind in ("lateral", "output"):
            conv = getattr(model.backbone, f"fpn_{kind}{level}")
            n_sites += _check_site(conv, head_type, f"fpn_{kind}")
    # box head convs (4conv1fc) and fcs
    box_head = model.roi_heads.box_head
    assert len(box_head.conv_norm_relus) == cfg.MODEL.ROI_BOX_HEAD.NUM_CONV
    assert len(box_head.fcs) == cfg.MODEL.ROI_BOX_HEAD.NUM_FC
    for conv in box_head.conv_norm_relus:
        n_sites += _check_site(conv, head_type, "box head conv")
    # mask head convs
    if exp["mask"]:
        assert model.roi_heads.mask_on
        convs = model.roi_heads.mask_head.conv_norm_relus
        assert len(convs) == cfg.MODEL.ROI_MASK_HEAD.NUM_CONV > 0
        for conv in convs:
            n_sites += _check_site(conv, head_type, "mask head conv")

    # no other norm anywhere (e.g. an RPN conv), and conv-side transforms exactly where due
    if not exp["mask"] and model.roi_heads.mask_on:  # built as the Mask R-CNN twin
        n_sites += len(model.roi_heads.mask_head.conv_norm_relus) if head_type else 0
    all_convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    with_norm = [c for c in all_convs if isinstance(getattr(c, "norm", None), nn.Module)]
    assert len(with_norm) == n_sites
    ws = cfg.D2NORM.WS
    for conv in all_convs:
        n, t = getattr(conv, "norm", None), get_weight_transform(conv)
        if isinstance(n, GroupNormWS):
            assert isinstance(t, WeightStandardization)
            assert (t.convention, t.eps) == (ws.CONVENTION, ws.EPS)
        elif isinstance(n, MovingAverageBatchNorm2d) or (
            exp["norm"] == "MABN" and isinstance(n, _frozen_bn_type())
        ):  # a frozen MABN stage keeps its conv's centralization
            assert isinstance(t, WeightCentralization)
            assert isinstance(n, _frozen_bn_type()) or n.buffer_size == cfg.D2NORM.MABN.BUFFER_SIZE
        else:
            assert t is None
        if isinstance(n, CrossIterationBatchNorm2d):
            assert n.bound_conv is conv
            assert (n.buffer_size, n.burnin) == (cfg.D2NORM.CBN.BUFFER_SIZE,
                                                 cfg.D2NORM.CBN.BURNIN_ITERS)
        if isinstance(n, nn.GroupNorm):
            assert n.num_groups == cfg.D2NORM.GN.NUM_GROUPS


def _groups():
    """Recipes by model structure; Mask R-CNN recipes first, so a group builds a Mask R-CNN
    whenever it has one (groups of Faster R-CNN recipes only build a Faster R-CNN)."""
    groups = {}
    for path in sorted(RECIPES, key=lambda p: not _expected_from_name(p)["mask"]):
        groups.setdefault(_structure_key(_load(path)), []).append(path)
    return list(groups.values())


_GROUPS = _groups()


@pytest.mark.parametrize("paths", _GROUPS, ids=lambda ps: _rel(ps[0]))
def test_built_model_has_the_recipe_norm_at_every_call_site(paths):
    """One build per distinct architecture; every recipe sharing it is checked on it."""
    first = _load(paths[0])
    if not first.MODEL.MASK_ON:
        assert not any(_expected_from_name(p)["mask"] for p in paths)
    first.MODEL.DEVICE = "cpu"
    first.MODEL.WEIGHTS = ""
    with _structure_only_init():
        model = d2norm.build_model(first)
    for path in paths:
        cfg = _load(path)
        assert _structure_key(cfg) == _structure_key(first)
        _check_model(cfg, model, _expected_from_name(path))
