"""The CBN failing-regime warning (d2norm/engine/cbn_regime.py) and the synthetic-recipe check."""

import json
import logging
import os
import sys

import pytest

from d2norm.engine.cbn_regime import cbn_regime_warning, warn_cbn_regime

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
import check_synthetic_recipes  # noqa: E402


def _cfg(backbone="CBN", fpn="CBN", box="CBN", mask="CBN", **d2norm_cbn):
    from d2norm import add_d2norm_config

    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_d2norm_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, "configs", "synthetic", "Base-Synthetic.yaml"))
    cfg.MODEL.RESNETS.NORM, cfg.MODEL.FPN.NORM = backbone, fpn
    cfg.MODEL.ROI_BOX_HEAD.NORM, cfg.MODEL.ROI_MASK_HEAD.NORM = box, mask
    cfg.D2NORM.CBN.BUFFER_SIZE = 4
    cfg.D2NORM.CBN.GRAD_THROUGH_COMPENSATION = False
    for key, value in d2norm_cbn.items():
        cfg.D2NORM.CBN[key] = value
    return cfg


def test_heads_with_paper_gradient_warn_and_name_the_keys_and_the_fix():
    msg = cbn_regime_warning(_cfg())
    assert msg is not None
    assert "MODEL.ROI_BOX_HEAD.NORM" in msg and "MODEL.ROI_MASK_HEAD.NORM" in msg
    assert "D2NORM.CBN.GRAD_THROUGH_COMPENSATION True" in msg and "4-iteration" in msg
    only_mask = cbn_regime_warning(_cfg(box="GN"))
    assert "MODEL.ROI_MASK_HEAD.NORM" in only_mask and "ROI_BOX_HEAD" not in only_mask


@pytest.mark.parametrize(
    "case",
    [
        dict(box="GN", mask="GN"),  # CBN in backbone / FPN only
        dict(BUFFER_SIZE=1),  # plain BN
        dict(GRAD_THROUGH_COMPENSATION=True),  # the exact gradient
        dict(backbone="GN", fpn="GN", box="BN", mask="SyncBN"),
    ],
)
def test_no_warning_outside_the_regime(case):
    assert cbn_regime_warning(_cfg(**case)) is None


def test_pretrained_weights_are_not_warned_about():
    cfg = _cfg()
    cfg.MODEL.WEIGHTS = "R-50.pkl"  # the published setting: CBN in the heads of a pretrained model
    assert cbn_regime_warning(cfg) is None


def test_head_norm_without_convs_is_not_warned_about():
    cfg = _cfg(mask="GN")
    cfg.MODEL.ROI_BOX_HEAD.NUM_CONV = 0  # a 2fc box head builds no norm
    assert cbn_regime_warning(cfg) is None
    cfg = _cfg(box="GN")
    cfg.MODEL.MASK_ON = False
    assert cbn_regime_warning(cfg) is None


def test_trainer_logs_the_warning_once(tmp_path, data_root, caplog):
    from helpers import synthetic_cfg

    from d2norm.engine import Trainer

    cfg = synthetic_cfg("CBN", **{"D2NORM.DATA.ROOT": data_root, "D2NORM.CBN.BUFFER_SIZE": 3})
    cfg.OUTPUT_DIR = str(tmp_path)
    with caplog.at_level(logging.WARNING, logger="d2norm"):
        Trainer(cfg)
    hits = [r for r in caplog.records if "GRAD_THROUGH_COMPENSATION" in r.getMessage()]
    assert len(hits) == 1 and hits[0].levelno == logging.WARNING
    caplog.clear()
    cfg.D2NORM.CBN.GRAD_THROUGH_COMPENSATION = True
    with caplog.at_level(logging.WARNING, logger="d2norm"):
        Trainer(cfg)
    assert not [r for r in caplog.records if "GRAD_THROUGH_COMPENSATION" in r.getMessage()]


def test_warn_returns_the_message_it_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="d2norm"):
        msg = warn_cbn_regime(_cfg())
    assert [r.getMessage() for r in caplog.records] == [msg]


def _metrics(path, box, mask):
    path.mkdir(parents=True)
    rows = [{"iteration": 9, "total_loss": 1.0}, {"iteration": 9, "bbox/AP": box, "segm/AP": mask}]
    (path / "metrics.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_recipe_check_margin_against_gn(tmp_path):
    _metrics(tmp_path / "gn", 80.0, 85.0)
    _metrics(tmp_path / "cbn", 71.0, 76.0)
    res = {
        "GN": check_synthetic_recipes.final_ap(str(tmp_path / "gn")),
        "CBN": check_synthetic_recipes.final_ap(str(tmp_path / "cbn")),
        "MABN": check_synthetic_recipes.final_ap(str(tmp_path / "none")),
    }
    assert res["GN"] == (80.0, 85.0) and res["MABN"] is None
    verdict = check_synthetic_recipes.check(res, margin=10)
    assert verdict["GN"][0] and verdict["CBN"][0] and verdict["MABN"] == (False, "missing")
    verdict = check_synthetic_recipes.check(res, margin=8.5)
    assert not verdict["CBN"][0] and "box 71.0 < 80.0 - 8.5" in verdict["CBN"][1]
    with pytest.raises(ValueError, match="GN"):
        check_synthetic_recipes.check({"CBN": (1.0, 1.0)}, margin=10)
