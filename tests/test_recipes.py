"""Every recipe under configs/ loads, and builds the model its file name promises.

The norm, model, backbone, schedule and scratch/fine-tune setting are read from the recipe's
*file name* (detectron2's naming: ``mask_rcnn_X_101_32x8d_FPN_3x_gn_ws.yaml``), then checked
against the effective config and against the modules of the built model at every call site:
backbone bottom-up (stem, res2-res5), FPN lateral/output convs, box head convs, mask head convs.
Stage depths come from torchvision's ResNet of the same depth. Recipes that cite a published
number are checked against the official setting in test_official_recipes.py; a recipe completing
the grid ("none published") of a family with one published setting (CBN, MABN, GN+WS, and the
1x SyncBN / GN of the CBN paper) must keep that setting's norm-specific keys. Models are built on
CPU without weights, once per distinct architecture.
"""

import functools
import os
import re

import pytest
from recipe_models import (
    RECIPES,
    STAGES,
    built_model,
    call_sites,
    header,
    load,
    rel,
    structure_key,
    structure_only_init,
)
from torch import nn

from d2norm.layers import (
    BatchChannelNormWS,
    BatchRenorm2d,
    CrossIterationBatchNorm2d,
    EvoNormS0,
    FilterResponseNorm2d,
    FrozenStatisticsBatchNorm2d,
    GroupNorm,
    GroupNormWS,
    MovingAverageBatchNorm2d,
    SyncBatchNorm2d,
)
from d2norm.layers.weight_transforms import (
    WeightCentralization,
    WeightStandardization,
    get_weight_transform,
)

_COCO_NAME = re.compile(
    r"^(?P<scratch>scratch_)?(?P<arch>mask|faster)_rcnn_(?P<bb>R_50|R_101|X_101_32x8d|X_50_32x4d|"
    r"X_101_32x4d)_FPN_(?P<sched>\d+x|20_23_24e)"
    r"(?:_(?P<norm>syncbn|gn_ws|gn_contrib|gn|cbn|mabn|bn|frozenstatsbn|bcn_ws))?\.yaml$"
)
_SYNTH_NAME = re.compile(
    r"^mask_rcnn_R_18_FPN_(?P<norm>BN|CBN|GN|GN_WS|MABN|SyncBN|BRN|FRN|EvoNorm|BCN_WS)\.yaml$"
)
_NORM_OF_SUFFIX = {
    None: "FrozenBN",
    "syncbn": "SyncBN",
    "gn": "GN",
    "gn_contrib": "GN",
    "gn_ws": "GN+WS",
    "bcn_ws": "BCN+WS",
    "cbn": "CBN",
    "mabn": "MABN",
    "bn": "BN",
    "frozenstatsbn": "FrozenStatsBN",
    "BN": "BN",
    "CBN": "CBN",
    "GN": "GN",
    "GN_WS": "GN+WS",
    "MABN": "MABN",
    "SyncBN": "SyncBN",
    "BRN": "BRN",
    "FRN": "FRN",
    "EvoNorm": "EvoNorm-S0",
    "BCN_WS": "BCN+WS",
}
_BACKBONE = {
    "R_18": (18, 1, 64),
    "R_50": (50, 1, 64),
    "R_101": (101, 1, 64),
    "X_101_32x8d": (101, 32, 8),
    "X_50_32x4d": (50, 32, 4),
    "X_101_32x4d": (101, 32, 4),
}
_EPOCH_SCHEDULES = {"20_23_24e": 2}  # 24 epochs: the iterations of a 2x schedule
_NORM_TYPE = {
    "": None,
    "BN": nn.BatchNorm2d,
    "SyncBN": SyncBatchNorm2d,
    "GN": GroupNorm,
    "GN+WS": GroupNormWS,
    "CBN": CrossIterationBatchNorm2d,
    "MABN": MovingAverageBatchNorm2d,
    "FrozenStatsBN": FrozenStatisticsBatchNorm2d,
    "BRN": BatchRenorm2d,
    "FRN": FilterResponseNorm2d,
    "EvoNorm-S0": EvoNormS0,
    "BCN+WS": BatchChannelNormWS,
}
# norms that detectron2's freeze (and d2norm's preparation pass) turn into FrozenBN
_FROZEN_TO_FROZENBN = ("FrozenBN", "BN", "SyncBN", "CBN", "MABN", "FrozenStatsBN", "BRN")
# families with one published setting, which their grid recipes keep: (norm, schedule)
_ONE_SETTING = {("CBN", "1x"), ("MABN", "2x"), ("GN+WS", "1x"), ("SyncBN", "1x"), ("GN", "1x")}
# the MABN paper's SyncBN fine-tuning baseline trains everything (official FREEZE_CONV_BODY_AT -1)
_NOTHING_FROZEN = {"COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_2x_syncbn.yaml"}


def _frozen_bn_type():
    from detectron2.layers import FrozenBatchNorm2d

    return FrozenBatchNorm2d


def _norm_type(name):
    return _frozen_bn_type() if name == "FrozenBN" else _NORM_TYPE[name]


def _expected_from_name(path):
    """What the file name promises: dict(norm, mask, backbone, sched, scratch, coco, suffix)."""
    name, folder = os.path.basename(path), os.path.basename(os.path.dirname(path))
    if folder == "synthetic":
        m = _SYNTH_NAME.match(name)
        assert m, f"{folder}/{name}: not a recipe name of the form mask_rcnn_R_18_FPN_<NORM>.yaml"
        return dict(
            norm=_NORM_OF_SUFFIX[m["norm"]],
            mask=True,
            backbone="R_18",
            sched=None,
            scratch=True,
            coco=False,
            suffix=m["norm"],
        )
    m = _COCO_NAME.match(name)
    assert m, f"{folder}/{name}: not a detectron2-style recipe name"
    return dict(
        norm=_NORM_OF_SUFFIX[m["norm"]],
        mask=m["arch"] == "mask",
        backbone=m["bb"],
        sched=m["sched"],
        scratch=bool(m["scratch"]),
        coco=True,
        suffix=m["norm"],
    )


def _cites_a_number(path):
    h = header(path)
    return "Published target" in h and not re.search(r"Published target[^\n]*\n\s*none published", h)


# ----------------------------------------------------------------------------- config level
def test_recipe_set_is_complete():
    """One file per published row, and the norm x backbone x schedule grid of both models."""
    names = {rel(p) for p in RECIPES}
    for must in [
        "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml",
        "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x_gn.yaml",
        "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x_syncbn.yaml",
        "COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_2x_gn.yaml",
        "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_cbn.yaml",
        "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_frozenstatsbn.yaml",
        "COCO-Detection/faster_rcnn_R_50_FPN_1x_frozenstatsbn.yaml",
        "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_2x_mabn.yaml",
        "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_2x_gn_contrib.yaml",
        "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x_gn_contrib.yaml",
        "COCO-Detection/faster_rcnn_R_50_FPN_1x_gn_ws.yaml",
        "COCO-Detection/faster_rcnn_X_101_32x4d_FPN_1x_gn_ws.yaml",
        "COCO-Detection/faster_rcnn_X_50_32x4d_FPN_1x_gn_ws.yaml",
        "Misc/scratch_mask_rcnn_R_50_FPN_3x_gn.yaml",
        "Misc/scratch_mask_rcnn_R_101_FPN_3x_gn.yaml",
        "Misc/scratch_mask_rcnn_R_50_FPN_9x_gn.yaml",
        "Misc/scratch_mask_rcnn_R_50_FPN_9x_syncbn.yaml",
        "Misc/scratch_mask_rcnn_R_50_FPN_2x_mabn.yaml",
    ]:
        assert must in names, must
    for bb in ("R_50", "R_101", "X_50_32x4d", "X_101_32x4d"):  # mmdetection's GN+WS Mask R-CNN rows
        for sched in ("2x", "20_23_24e"):
            name = f"COCO-InstanceSegmentation/mask_rcnn_{bb}_FPN_{sched}_gn_ws.yaml"
            assert name in names, name
    for arch, folder in (("mask", "COCO-InstanceSegmentation"), ("faster", "COCO-Detection")):
        for bb in ("R_50", "R_101", "X_101_32x8d"):
            for suffix, scheds in (
                ("", "123"),
                ("_syncbn", "123"),
                ("_gn", "123"),
                ("_gn_ws", "1"),
                ("_cbn", "1"),
                ("_mabn", "2"),
            ):
                for s in scheds:
                    name = f"{folder}/{arch}_rcnn_{bb}_FPN_{s}x{suffix}.yaml"
                    assert name in names, name


def _check_input_conventions(path, cfg, exp):
    """Input format, pixel statistics, stride and freezing follow the weights and the family."""
    M, norm = cfg.MODEL, exp["norm"]
    groups = _BACKBONE[exp["backbone"]][1]
    if groups > 1:  # detectron2's ResNeXt layout
        assert M.RESNETS.STRIDE_IN_1X1 is False
    if exp["scratch"]:
        assert M.WEIGHTS == "" and M.BACKBONE.FREEZE_AT == 0
        return
    assert M.WEIGHTS.startswith("pretrained/")
    if norm == "MABN":  # official fine-tuning: nothing frozen, maskrcnn-benchmark input
        assert M.BACKBONE.FREEZE_AT == 0
        assert cfg.INPUT.FORMAT == "BGR" and list(M.PIXEL_STD) == [1.0, 1.0, 1.0]
        assert M.WEIGHTS.endswith("-wc.pth") or M.WEIGHTS.endswith("R50-wc.pth")
        assert M.RESNETS.STRIDE_IN_1X1 is (groups == 1)
        return
    assert M.BACKBONE.FREEZE_AT == (0 if rel(path) in _NOTHING_FROZEN else 2)
    torchvision_style = M.WEIGHTS.endswith(".pth")
    assert (cfg.INPUT.FORMAT == "RGB") == torchvision_style
    if torchvision_style:
        assert M.RESNETS.STRIDE_IN_1X1 is False
        assert list(M.PIXEL_STD) == [58.395, 57.120, 57.375]
    elif M.WEIGHTS.endswith("-GN.pkl") or groups > 1:  # FAIR Caffe2 files: stride in the 3x3 conv
        assert M.RESNETS.STRIDE_IN_1X1 is False
    else:  # MSRA Caffe2 BN weights
        assert M.RESNETS.STRIDE_IN_1X1 is True and list(M.PIXEL_STD) == [1.0, 1.0, 1.0]
    if exp["backbone"] == "X_101_32x8d" and not torchvision_style:
        assert list(M.PIXEL_STD) == [57.375, 57.120, 58.395]


_SETTING_KEYS = (
    "MODEL.RESNETS.NORM",
    "MODEL.FPN.NORM",
    "MODEL.ROI_BOX_HEAD.NORM",
    "MODEL.ROI_BOX_HEAD.NUM_CONV",
    "MODEL.ROI_BOX_HEAD.NUM_FC",
    "MODEL.BACKBONE.FREEZE_AT",
    "INPUT.FORMAT",
    "INPUT.MIN_SIZE_TRAIN",
    "INPUT.MAX_SIZE_TRAIN",
    "SOLVER.IMS_PER_BATCH",
    "SOLVER.STEPS",
    "SOLVER.MAX_ITER",
    "SOLVER.WEIGHT_DECAY_NORM",
    "SOLVER.WEIGHT_DECAY_BIAS",
    "SOLVER.BIAS_LR_FACTOR",
    "TEST.PRECISE_BN.ENABLED",
    "D2NORM",
)


def _get(cfg, key):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg.dump() if hasattr(cfg, "dump") else cfg


def _cited_sibling(exp):
    """The R-50 recipe of the same norm and schedule that cites a number (mask first)."""
    for arch, folder in (("mask", "COCO-InstanceSegmentation"), ("faster", "COCO-Detection")):
        path = os.path.join(
            os.path.dirname(os.path.dirname(RECIPES[0])),
            folder,
            f"{arch}_rcnn_R_50_FPN_{exp['sched']}_{exp['suffix']}.yaml",
        )
        if os.path.exists(path) and _cites_a_number(path):
            return path
    raise AssertionError(f"no cited R-50 recipe for {exp}")


@pytest.mark.parametrize("path", RECIPES, ids=rel)
def test_recipe_config_matches_its_name(path):
    exp = _expected_from_name(path)
    cfg = load(path)
    norm = exp["norm"]
    depth, groups, width = _BACKBONE[exp["backbone"]]
    M = cfg.MODEL
    assert M.META_ARCHITECTURE == "GeneralizedRCNN"
    assert M.BACKBONE.NAME == "build_resnet_fpn_backbone"
    assert M.MASK_ON == exp["mask"]
    assert (M.RESNETS.DEPTH, M.RESNETS.NUM_GROUPS) == (depth, groups)
    if groups > 1:
        assert M.RESNETS.WIDTH_PER_GROUP == width
    heads = (M.FPN.NORM, M.ROI_BOX_HEAD.NORM, M.ROI_MASK_HEAD.NORM)
    # the CBN paper's setting: BN with frozen statistics in the backbone, the norm in FPN + heads
    cbn_paper = (
        exp["coco"]
        and not exp["scratch"]
        and (norm == "FrozenStatsBN" or (exp["sched"] == "1x" and norm in ("SyncBN", "GN", "CBN")))
    )
    if norm == "FrozenBN":  # BN*: detectron2's baseline layout
        assert M.RESNETS.NORM == "FrozenBN" and heads == ("", "", "")
    elif cbn_paper:
        assert M.RESNETS.NORM == "FrozenStatsBN"
        assert heads == ((norm,) * 3 if norm != "FrozenStatsBN" else ("", "", ""))
    elif norm == "CBN" and not exp["coco"]:  # CBN where it trains from scratch (docs/cbn_diagnosis.md)
        assert M.RESNETS.NORM == "CBN" and heads == ("CBN", "BN", "BN")
    else:
        assert M.RESNETS.NORM == norm and heads == (norm,) * 3
    if exp["coco"] and norm != "FrozenBN":  # the published 4conv1fc head
        assert (M.ROI_BOX_HEAD.NUM_CONV, M.ROI_BOX_HEAD.NUM_FC) == (4, 1)
    if not exp["coco"]:
        return
    # schedule: 1x = 90k iterations at 16 images; 9x = 9 x 90k x 16 images
    k = _EPOCH_SCHEDULES.get(exp["sched"]) or int(exp["sched"][:-1])
    assert cfg.SOLVER.MAX_ITER * cfg.SOLVER.IMS_PER_BATCH == k * 90000 * 16
    assert all(s < cfg.SOLVER.MAX_ITER for s in cfg.SOLVER.STEPS)
    _check_input_conventions(path, cfg, exp)
    if norm == "GN+WS":
        assert cfg.D2NORM.WS.CONVENTION == "std_plus_eps"  # WS-pretrained weights' convention
    if norm == "BCN+WS":  # the BCN authors' ImageNet weights' convention
        assert cfg.D2NORM.WS.CONVENTION == "sqrt_unbiased_var"
    # the header cites the published number it targets (or says there is none)
    h = header(path)
    assert "Published target" in h
    assert re.search(r"\d\d\.\d box AP", h) or "none published" in h
    assert "Pretrained weights" in h or exp["scratch"]
    if not _cites_a_number(path) and (norm, exp["sched"]) in _ONE_SETTING:
        sibling = load(_cited_sibling(exp))
        for key in _SETTING_KEYS:
            assert _get(cfg, key) == _get(sibling, key), f"{rel(path)}: {key} differs from its family"


# ----------------------------------------------------------------------------- built models
@functools.lru_cache(maxsize=None)
def _torchvision_stage_blocks(depth, groups):
    """Blocks per stage of torchvision's ResNet / ResNeXt of this depth (reference)."""
    import torchvision

    build = {
        18: torchvision.models.resnet18,
        50: torchvision.models.resnet50,
        101: torchvision.models.resnet101,
    }[depth]
    with structure_only_init():
        tv = build(groups=groups, width_per_group=64 if groups == 1 else 4) if depth >= 50 else build()
    return tuple(len(getattr(tv, f"layer{i}")) for i in (1, 2, 3, 4))


def _check_model(cfg, model, exp):
    M = cfg.MODEL
    freeze_at = M.BACKBONE.FREEZE_AT
    depth, groups, width = _BACKBONE[exp["backbone"]]
    site_norm = {"fpn": M.FPN.NORM, "box_head": M.ROI_BOX_HEAD.NORM, "mask_head": M.ROI_MASK_HEAD.NORM}

    # every call site: the configured norm (FrozenBN in frozen stages for BN-type norms)
    n_sites = 0
    for site, conv in call_sites(model):
        if site in STAGES:
            name = M.RESNETS.NORM
            if STAGES.index(site) < freeze_at and name in _FROZEN_TO_FROZENBN:
                name = "FrozenBN"
        else:
            name = site_norm[site]
        norm, want = getattr(conv, "norm", None), _norm_type(name)
        if want is None:
            assert norm is None, f"{site} conv: expected no norm, got {type(norm).__name__}"
        else:
            assert type(norm) is want, f"{site} conv: expected {want.__name__}, got {type(norm).__name__}"
            n_sites += 1
    bottom_up = model.backbone.bottom_up
    for idx, stage in enumerate(STAGES):
        frozen = idx < freeze_at
        assert all(p.requires_grad != frozen for p in getattr(bottom_up, stage).parameters()), stage
    assert tuple(len(getattr(bottom_up, f"res{i}")) for i in (2, 3, 4, 5)) == _torchvision_stage_blocks(
        depth, groups
    )
    if depth >= 50:  # bottleneck blocks: groups and widths (ResNeXt: grouped 3x3 convs)
        for s, stage in enumerate(["res2", "res3", "res4", "res5"]):
            for block in getattr(bottom_up, stage):
                assert block.conv2.groups == groups
                assert block.conv2.out_channels == groups * width * 2**s
                assert block.conv2.weight.shape[1] == width * 2**s
        stride_in_1x1 = M.RESNETS.STRIDE_IN_1X1
        assert bottom_up.res3[0].conv1.stride == ((2, 2) if stride_in_1x1 else (1, 1))
        assert bottom_up.res3[0].conv2.stride == ((1, 1) if stride_in_1x1 else (2, 2))
    box_head = model.roi_heads.box_head
    assert len(box_head.conv_norm_relus) == M.ROI_BOX_HEAD.NUM_CONV
    assert len(box_head.fcs) == M.ROI_BOX_HEAD.NUM_FC
    assert len(model.roi_heads.mask_head.conv_norm_relus) == M.ROI_MASK_HEAD.NUM_CONV > 0

    # no other norm anywhere (e.g. an RPN conv), and conv-side transforms exactly where due
    all_convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len([c for c in all_convs if isinstance(getattr(c, "norm", None), nn.Module)]) == n_sites
    ws = cfg.D2NORM.WS
    for conv in all_convs:
        n, t = getattr(conv, "norm", None), get_weight_transform(conv)
        if isinstance(n, (GroupNormWS, BatchChannelNormWS)):
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
            assert (n.buffer_size, n.burnin) == (cfg.D2NORM.CBN.BUFFER_SIZE, cfg.D2NORM.CBN.BURNIN_ITERS)
        if isinstance(n, nn.GroupNorm):
            assert n.num_groups == cfg.D2NORM.GN.NUM_GROUPS
        if isinstance(n, BatchChannelNormWS):  # frozen stages: the batch part is a FrozenBN
            assert n.num_groups == cfg.D2NORM.BCN.NUM_GROUPS
            assert isinstance(n.bn, _frozen_bn_type()) or n.bn.mode == cfg.D2NORM.BCN.MODE


def _groups():
    """Recipes by model structure (a Faster R-CNN recipe shares the Mask R-CNN twin's build)."""
    groups = {}
    for path in RECIPES:
        groups.setdefault(structure_key(load(path)), []).append(path)
    return list(groups.values())


_GROUPS = _groups()


@pytest.mark.parametrize("paths", _GROUPS, ids=lambda ps: rel(ps[0]))
def test_built_model_has_the_recipe_norm_at_every_call_site(paths):
    """One build per distinct architecture; every recipe sharing it is checked on it."""
    model = built_model(load(paths[0]))
    for path in paths:
        _check_model(load(path), model, _expected_from_name(path))
