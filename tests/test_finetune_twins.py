"""The synthetic twins of the COCO recipes (configs/synthetic/finetune/): each keeps its COCO
recipe's norm layout, freezing, weight-decay and optimizer settings; only data, size and schedule
differ, the same way in every twin."""

import os

import pytest
from helpers import REPO, run_code

import d2norm
from d2norm.study.finetune import ARMS, twin_path

from detectron2.config import get_cfg

FINETUNE = os.path.join(REPO, "configs", "synthetic", "finetune")

#: twin -> the COCO recipe it inherits (transcribed from each twin's _BASE_ line and comment)
TWINS = {
    "faster_rcnn_R_18_FPN_frozenbn.yaml": "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml",
    "faster_rcnn_R_18_FPN_syncbn.yaml": "COCO-Detection/faster_rcnn_R_50_FPN_1x_syncbn.yaml",
    "faster_rcnn_R_18_FPN_gn.yaml": "COCO-Detection/faster_rcnn_R_50_FPN_3x_gn.yaml",
    "faster_rcnn_R_18_FPN_gn_ws.yaml": "COCO-Detection/faster_rcnn_R_50_FPN_1x_gn_ws.yaml",
    "faster_rcnn_R_18_FPN_cbn.yaml": "COCO-Detection/faster_rcnn_R_50_FPN_1x_cbn.yaml",
    "faster_rcnn_R_18_FPN_mabn.yaml": "COCO-Detection/faster_rcnn_R_50_FPN_2x_mabn.yaml",
    "faster_rcnn_R_18_FPN_bcn_ws.yaml": "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_2x_bcn_ws.yaml",
}
#: keys that are counts of iterations of the schedule: the twin scales them (checked below)
SCHEDULE_KEYS = {"D2NORM.CBN.BURNIN_ITERS", "D2NORM.MABN.WARMUP_ITERS", "TEST.PRECISE_BN.NUM_ITER"}


def _cfg(path):
    cfg = get_cfg()
    d2norm.add_d2norm_config(cfg)
    cfg.merge_from_file(path)
    return cfg


def _flat(node, prefix=""):
    out = {}
    for k, v in node.items():
        key = f"{prefix}{k}"
        if hasattr(v, "items"):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _is_compared(key):
    """norm, freeze and optimizer keys (the issue's list), plus the head layout they sit in."""
    return (
        key.endswith(".NORM")
        or key.startswith("D2NORM.")
        and not key.startswith("D2NORM.DATA.")
        or key in ("MODEL.BACKBONE.FREEZE_AT", "MODEL.RESNETS.STRIDE_IN_1X1", "TEST.PRECISE_BN.ENABLED")
        or key.startswith("MODEL.ROI_BOX_HEAD.")
        and key.split(".")[-1] in ("NAME", "NUM_CONV", "NUM_FC")
        or key.startswith("SOLVER.")
        and key.split(".")[1]
        in (
            "WEIGHT_DECAY",
            "WEIGHT_DECAY_NORM",
            "WEIGHT_DECAY_BIAS",
            "BIAS_LR_FACTOR",
            "MOMENTUM",
            "NESTEROV",
            "GAMMA",
            "CLIP_GRADIENTS",
            "WARMUP_METHOD",
            "LR_SCHEDULER_NAME",
        )
    )


@pytest.mark.parametrize("twin", sorted(TWINS))
def test_twin_keeps_its_coco_recipe_norm_freeze_and_optimizer_keys(twin):
    coco = _flat(_cfg(os.path.join(REPO, "configs", TWINS[twin])))
    mine = _flat(_cfg(os.path.join(FINETUNE, twin)))
    compared = [k for k in coco if _is_compared(k) and k not in SCHEDULE_KEYS]
    assert len(compared) > 40
    differ = {k: (coco[k], mine[k]) for k in compared if coco[k] != mine[k]}
    assert differ == {}
    # the twin's own _BASE_ is the COCO recipe (it inherits, not restates)
    text = open(os.path.join(FINETUNE, twin), encoding="utf-8").read()
    assert f'_BASE_: "../../{TWINS[twin]}"' in text
    # the LR is the recipe's, linearly scaled to the twin's batch (0.02 at 16 images)
    assert mine["SOLVER.BASE_LR"] / mine["SOLVER.IMS_PER_BATCH"] == pytest.approx(
        coco["SOLVER.BASE_LR"] / coco["SOLVER.IMS_PER_BATCH"]
    )
    # burn-in: the same fraction of the schedule as the recipe's (CBN: 58,633 of 90,000)
    if coco["D2NORM.CBN.BURNIN_ITERS"]:
        assert mine["D2NORM.CBN.BURNIN_ITERS"] / mine["SOLVER.MAX_ITER"] == pytest.approx(
            coco["D2NORM.CBN.BURNIN_ITERS"] / coco["SOLVER.MAX_ITER"], abs=0.005
        )


def test_twins_share_data_size_and_schedule():
    """Everything outside the compared keys, input convention and weights is the same in every twin."""
    flats = {t: _flat(_cfg(os.path.join(FINETUNE, t))) for t in TWINS}
    exempt = {"MODEL.WEIGHTS", "MODEL.PIXEL_MEAN", "MODEL.PIXEL_STD", "INPUT.FORMAT", "OUTPUT_DIR"}
    shared = {
        k
        for k in flats["faster_rcnn_R_18_FPN_syncbn.yaml"]
        if not _is_compared(k) and k not in exempt and not k.startswith("MODEL.RESNETS.")
    }
    first = flats["faster_rcnn_R_18_FPN_syncbn.yaml"]
    for twin, flat in flats.items():
        differ = {k: (first[k], flat[k]) for k in shared if flat[k] != first[k]}
        assert differ == {}, twin
        assert flat["SOLVER.IMS_PER_BATCH"] == 8 and flat["MODEL.RESNETS.DEPTH"] == 18
        assert flat["DATASETS.TRAIN"] == ("d2norm_shapes_hard_train",)


def test_bn_heads_twin_is_the_syncbn_twin_with_per_process_bn():
    sync = _flat(_cfg(os.path.join(FINETUNE, "faster_rcnn_R_18_FPN_syncbn.yaml")))
    bn = _flat(_cfg(os.path.join(FINETUNE, "faster_rcnn_R_18_FPN_bn_heads.yaml")))
    differ = {k for k in sync if sync[k] != bn[k]}
    assert differ == {"MODEL.FPN.NORM", "MODEL.ROI_BOX_HEAD.NORM", "MODEL.ROI_MASK_HEAD.NORM"}
    assert {bn[k] for k in differ} == {"BN"}


def test_every_arm_names_an_existing_twin():
    for arm, (twin, variant, opts) in ARMS.items():
        assert os.path.isfile(twin_path(twin)), arm
        assert variant in (None, "BN", "GN", "GN+WS", "MABN", "BCN+WS")
        assert len(opts) % 2 == 0


def test_twin_builds_in_a_fresh_interpreter_that_imports_only_d2norm():
    """``train_net.py`` imports ``d2norm`` and nothing of the study: the backbone the twins (and
    the study configs) name must be registered by that import alone."""
    code = (
        "import d2norm\n"
        "from detectron2.config import get_cfg\n"
        "cfg = get_cfg(); d2norm.add_d2norm_config(cfg)\n"
        f"cfg.merge_from_file({twin_path(ARMS['GN'][0])!r}); cfg.MODEL.WEIGHTS = ''\n"
        "m = d2norm.build_model(cfg)\n"
        "assert 'd2norm.study' not in __import__('sys').modules\n"
        "print(sorted(m.backbone.output_shape()))\n"
    )
    out = run_code(code)
    assert out.returncode == 0, out.stderr[-2000:]
    # FPN over res2-res4 and p5 max-pooled from p4 (the twin's IN_FEATURES)
    assert out.stdout.strip().splitlines()[-1] == "['p2', 'p3', 'p4', 'p5']"
