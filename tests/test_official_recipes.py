"""Every recipe that cites a published COCO number sets up the experiment behind that number.

The official settings are transcribed once, each with its source line, in
``tests/data/official_recipes.yaml``. This test translates them with the conventions of the
official codebase (mmdetection's ``frozen_stages``, ``style``, ``to_rgb``, epochs; Detectron's and
maskrcnn-benchmark's optimizer rules; CBN's ``buffer_num``; MABN's ``real_B / B``) into detectron2
/ d2norm config values and compares them with each recipe's *effective* config (get_cfg +
add_d2norm_config + merge_from_file, ``_BASE_`` merged) and with the norm built at every call
site. A difference is allowed only where the table declares it with a justification, and a
declared difference must exist. It also checks that the recipe header cites the published number
and the per-GPU batch of the official run, and that every recipe citing a number is in the table.
"""

import math
import os
import re
from decimal import ROUND_HALF_UP, Decimal

import pytest
import yaml
from recipe_models import RECIPES, STAGES, built_model, call_sites, header, load, rel
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
TABLE = os.path.join(HERE, "data", "official_recipes.yaml")

#: Iterations per epoch of an epoch-based schedule: 12 epochs are the 90k iterations of a 1x
#: schedule at 16 images (COCO train2017: 117,266 images with annotations / 16 = 7,329).
ITERS_PER_EPOCH = 7500
#: COCO train2017 images with at least one annotation (what detectron2 and mmdetection train on):
#: the unit of the CBN paper's burn-in epochs.
COCO_TRAIN_IMAGES = 117266


# ------------------------------------------------------------------------------ the table
def _resolve_source(at, exp):
    """'path:line' / ':line' -> 'repo@commit:path:line' (absolute sources are kept)."""
    if "@" in at.split(":", 1)[0]:
        return at
    path, line = at.rsplit(":", 1)
    if not path:
        assert exp.get("config"), f"{exp['id']}: {at!r} refers to the config, which is not set"
        path = exp["config"]
    return f"{exp['repo']}@{exp['commit']}:{path}:{line}"


def load_table():
    raw = yaml.safe_load(open(TABLE))
    experiments = {}

    def resolve(name):
        if name in experiments:
            return experiments[name]
        spec = dict(raw["experiments"][name])
        spec["id"] = name
        values, differences = {}, {}
        if "extends" in spec:
            parent = resolve(spec["extends"])
            for k in ("repo", "commit", "codebase", "config"):
                spec.setdefault(k, parent[k])
            values, differences = dict(parent["values"]), dict(parent["differences"])
        for key, (value, at) in (spec.get("values") or {}).items():
            values[key] = (value, _resolve_source(str(at), spec))
        if "differences" in spec:
            differences = dict(spec["differences"] or {})
        spec["values"], spec["differences"] = values, differences
        experiments[name] = spec
        return spec

    for name in raw["experiments"]:
        resolve(name)
    return raw["weights"], experiments


WEIGHTS, EXPERIMENTS = load_table()
CASES = [(name, recipe) for name, exp in EXPERIMENTS.items() for recipe in exp["recipes"]]


def test_every_official_value_has_a_source_line():
    for name, exp in EXPERIMENTS.items():
        assert re.fullmatch(r"[0-9a-f]{40}", exp["commit"]), name
        assert exp["codebase"] in _RULES, name
        assert re.fullmatch(r".+@[0-9a-f]{40}:.+:\d+", _resolve_source(exp["published"]["at"], exp)), name
        for key, (_, at) in exp["values"].items():
            assert re.fullmatch(r"[\w.+-]+/[\w.+-]+@[0-9a-f]{40}:[^:]+:\d+", at), (name, key, at)


def test_every_recipe_that_cites_a_number_is_in_the_table():
    in_table = {recipe for _, recipe in CASES}
    assert len(in_table) == len(CASES), "a recipe is listed under two experiments"
    citing = set()
    for path in RECIPES:
        h = header(path)
        if "Published target" in h and not re.search(r"Published target[^\n]*\n\s*none published", h):
            citing.add(rel(path))
    assert citing == in_table, (sorted(citing - in_table), sorted(in_table - citing))


# ------------------------------------------------------------------------------ translation
def _freeze_at(cb, v):
    if cb == "mmdet":  # frozen_stages=k freezes the stem and k stages; -1 nothing
        return v + 1
    if cb == "maskrcnn_benchmark":  # FREEZE_CONV_BODY_AT: -1 freezes nothing
        return max(v, 0)
    return v  # Detectron TRAIN.FREEZE_AT, detectron2 MODEL.BACKBONE.FREEZE_AT


def _stride_in_1x1(cb, v):
    return v == "caffe" if cb == "mmdet" else bool(v)


def _first_set(*values):
    return next(v for v in values if v is not None)


# Optimizer treatment of norm parameters and biases, per codebase:
# (norm gamma decay, norm beta decay, other biases' decay, bias LR factor) from the values.
_RULES = {
    # detectron2/solver/build.py: norm modules get WEIGHT_DECAY_NORM, then "bias" parameters
    # WEIGHT_DECAY_BIAS (None: unchanged) and BIAS_LR_FACTOR
    "detectron2": lambda v: (
        v["norm_weight_decay"],
        _first_set(v["bias_weight_decay"], v["norm_weight_decay"]),
        _first_set(v["bias_weight_decay"], v["weight_decay"]),
        v["bias_lr_factor"],
    ),
    # Detectron optimizer.py: GN parameters WEIGHT_DECAY_GN; biases no decay at 2x LR
    "detectron": lambda v: (
        v["norm_weight_decay"],
        v["norm_weight_decay"],
        v["bias_weight_decay"],
        v["bias_lr_factor"],
    ),
    # mmcv Runner: SGD(model.parameters(), weight_decay=...) -- every parameter alike
    "mmdet": lambda v: (v["weight_decay"], v["weight_decay"], v["weight_decay"], 1.0),
    # maskrcnn-benchmark solver/build.py: "bias" in the name -> WEIGHT_DECAY_BIAS, BIAS_LR_FACTOR
    "maskrcnn_benchmark": lambda v: (
        v["weight_decay"],
        v["bias_weight_decay"],
        v["bias_weight_decay"],
        v["bias_lr_factor"],
    ),
}

_NORM_NAMES = {
    None: "",
    "": "",
    "FrozenBN": "FrozenBN",
    "AffineChannel": "FrozenBN",
    "BN": "BN",
    "SyncBN": "SyncBN",
    "GN": "GN",
    "GN+ConvWS": "GN+WS",
    "CBN": "CBN",
    "MABN": "MABN",
}


def _d2norm_name(values, site):
    official = values[f"{site}_norm"]
    if site == "backbone" and official == "BN" and values.get("backbone_norm_eval"):
        return "FrozenStatsBN"  # mmdetection's default backbone BN with norm_eval=True
    return _NORM_NAMES[official]


def expected_config(exp):
    """{detectron2 key: value the official setting translates to}."""
    cb, v = exp["codebase"], {k: value for k, (value, _) in exp["values"].items()}
    out = {
        "MODEL.MASK_ON": v["model"] == "mask",
        "MODEL.RESNETS.DEPTH": v["depth"],
        "MODEL.RESNETS.NUM_GROUPS": v["groups"],
        "MODEL.WEIGHTS": WEIGHTS[v["weights"]],
        "MODEL.RESNETS.NORM": _d2norm_name(v, "backbone"),
        "MODEL.FPN.NORM": _d2norm_name(v, "fpn"),
        "MODEL.ROI_BOX_HEAD.NORM": _d2norm_name(v, "box_head"),
        "MODEL.ROI_BOX_HEAD.NUM_CONV": v["box_head"][0],
        "MODEL.ROI_BOX_HEAD.NUM_FC": v["box_head"][1],
        "MODEL.BACKBONE.FREEZE_AT": _freeze_at(cb, v["frozen"]),
        "MODEL.RESNETS.STRIDE_IN_1X1": _stride_in_1x1(cb, v["stride"]),
        "INPUT.FORMAT": "RGB" if v["input_rgb"] else "BGR",
        "MODEL.PIXEL_MEAN": v["pixel_mean"],
        "MODEL.PIXEL_STD": v["pixel_std"],
        "INPUT.MIN_SIZE_TRAIN": v["train_min_size"],
        "INPUT.MAX_SIZE_TRAIN": v["train_max_size"],
        "SOLVER.BASE_LR": v["lr"],
        "SOLVER.WEIGHT_DECAY": v["weight_decay"],
        "TEST.PRECISE_BN.ENABLED": v["precise_bn"],
        "SOLVER.CLIP_GRADIENTS.ENABLED": v.get("grad_clip") is not None,
    }
    batch = v.get("images_per_batch") or v["gpus"] * v["images_per_gpu"]
    out["SOLVER.IMS_PER_BATCH"] = batch
    if v["groups"] > 1:
        out["MODEL.RESNETS.WIDTH_PER_GROUP"] = v["width_per_group"]
    if v["model"] == "mask":
        out["MODEL.ROI_MASK_HEAD.NORM"] = _d2norm_name(v, "mask_head")
        out["MODEL.ROI_MASK_HEAD.NUM_CONV"] = v["mask_head_convs"]
    gamma, beta, bias, bias_lr = _RULES[cb](v)
    out["SOLVER.WEIGHT_DECAY_NORM"] = gamma
    out["weight decay of norm beta"] = beta
    out["SOLVER.WEIGHT_DECAY_BIAS"] = bias
    out["SOLVER.BIAS_LR_FACTOR"] = bias_lr
    if "epochs" in v:
        scale = 16 / batch
        out["SOLVER.MAX_ITER"] = round(v["epochs"] * ITERS_PER_EPOCH * scale)
        out["SOLVER.STEPS"] = [round(e * ITERS_PER_EPOCH * scale) for e in v["step_epochs"]]
    else:
        out["SOLVER.MAX_ITER"], out["SOLVER.STEPS"] = v["max_iter"], v["steps"]
    norms = {out[k] for k in ("MODEL.RESNETS.NORM", "MODEL.FPN.NORM", "MODEL.ROI_BOX_HEAD.NORM")}
    norms.add(out.get("MODEL.ROI_MASK_HEAD.NORM"))
    if norms & {"GN", "GN+WS"}:
        out["D2NORM.GN.NUM_GROUPS"] = v["gn_groups"]
    if "GN+WS" in norms:
        assert v["ws"] == "mmcv_conv_ws"  # (w - mean) / (std_unbiased + 1e-5), mmcv conv_ws_2d
        out["D2NORM.WS.CONVENTION"], out["D2NORM.WS.EPS"] = "std_plus_eps", 1e-5
    if "CBN" in norms:
        # the official forward averages the current statistics with buffer_num stored ones
        out["D2NORM.CBN.BUFFER_SIZE"] = v["cbn_buffer_num"] + 1
        # the paper's burn-in epochs; D2NORM.CBN.BURNIN_ITERS 8 is the code's effective reading
        out["D2NORM.CBN.BURNIN_ITERS"] = round(v["cbn_burnin_epochs"] * COCO_TRAIN_IMAGES / batch)
    if "MABN" in norms:
        out["D2NORM.MABN.BUFFER_SIZE"] = v["mabn_real_B"] // v["mabn_B"]
        out["D2NORM.MABN.MOMENTUM"] = v["mabn_momentum"]
        out["D2NORM.MABN.WARMUP_ITERS"] = v["mabn_warmup"]
    return out


def actual_config(cfg):
    """The same keys read from a recipe's effective config (effective optimizer values)."""
    out = {}
    for key in (
        "MODEL.MASK_ON",
        "MODEL.RESNETS.DEPTH",
        "MODEL.RESNETS.NUM_GROUPS",
        "MODEL.RESNETS.WIDTH_PER_GROUP",
        "MODEL.WEIGHTS",
        "MODEL.RESNETS.NORM",
        "MODEL.FPN.NORM",
        "MODEL.ROI_BOX_HEAD.NORM",
        "MODEL.ROI_BOX_HEAD.NUM_CONV",
        "MODEL.ROI_BOX_HEAD.NUM_FC",
        "MODEL.ROI_MASK_HEAD.NORM",
        "MODEL.ROI_MASK_HEAD.NUM_CONV",
        "MODEL.BACKBONE.FREEZE_AT",
        "MODEL.RESNETS.STRIDE_IN_1X1",
        "INPUT.FORMAT",
        "MODEL.PIXEL_MEAN",
        "MODEL.PIXEL_STD",
        "INPUT.MIN_SIZE_TRAIN",
        "INPUT.MAX_SIZE_TRAIN",
        "SOLVER.BASE_LR",
        "SOLVER.WEIGHT_DECAY",
        "TEST.PRECISE_BN.ENABLED",
        "SOLVER.CLIP_GRADIENTS.ENABLED",
        "SOLVER.IMS_PER_BATCH",
        "SOLVER.WEIGHT_DECAY_NORM",
        "SOLVER.BIAS_LR_FACTOR",
        "SOLVER.MAX_ITER",
        "SOLVER.STEPS",
        "D2NORM.GN.NUM_GROUPS",
        "D2NORM.WS.CONVENTION",
        "D2NORM.WS.EPS",
        "D2NORM.CBN.BUFFER_SIZE",
        "D2NORM.CBN.BURNIN_ITERS",
        "D2NORM.MABN.BUFFER_SIZE",
        "D2NORM.MABN.MOMENTUM",
        "D2NORM.MABN.WARMUP_ITERS",
    ):
        node = cfg
        for part in key.split("."):
            node = node[part]
        out[key] = list(node) if isinstance(node, (tuple, list)) else node
    s = cfg.SOLVER
    out["SOLVER.WEIGHT_DECAY_BIAS"] = s.WEIGHT_DECAY if s.WEIGHT_DECAY_BIAS is None else s.WEIGHT_DECAY_BIAS
    # detectron2 applies the "bias" override after the norm one
    out["weight decay of norm beta"] = (
        s.WEIGHT_DECAY_NORM if s.WEIGHT_DECAY_BIAS is None else s.WEIGHT_DECAY_BIAS
    )
    return out


def _same(a, b):
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        numbers = isinstance(a, (int, float)) and isinstance(b, (int, float))
        return numbers and math.isclose(a, b, rel_tol=1e-9)
    return a == b


@pytest.mark.parametrize("name,recipe", CASES, ids=[r for _, r in CASES])
def test_effective_config_is_the_official_setting(name, recipe):
    exp = EXPERIMENTS[name]
    expected, actual = expected_config(exp), actual_config(load(recipe))
    declared = exp["differences"]
    assert set(declared) <= set(expected), f"{name}: difference declared for an unchecked key"
    wrong = {k: (actual[k], expected[k]) for k in expected if not _same(actual[k], expected[k])}
    undeclared = {k: v for k, v in wrong.items() if k not in declared}
    assert not undeclared, f"{recipe} differs from {name} (recipe, official): {undeclared}"
    stale = set(declared) - set(wrong)
    assert not stale, f"{name}: declared differences that do not exist: {sorted(stale)}"


def _round_half_up(x):
    return float(Decimal(str(x)).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP))


@pytest.mark.parametrize("name,recipe", CASES, ids=[r for _, r in CASES])
def test_header_cites_the_number_and_the_official_batch_split(name, recipe):
    exp, h = EXPERIMENTS[name], header(recipe)
    first = h.split("Published target", 1)[1].split("\n")[1]
    pub = exp["published"]
    m = re.match(r"\s*(\d+\.\d) box AP(?: / (\d+\.\d) mask AP)?\s+--", first)
    assert m, f"{recipe}: first published line {first!r}"
    assert float(m[1]) == _round_half_up(pub["box"]), (recipe, m[1], pub)
    if "mask" in pub:
        assert m[2] is not None and float(m[2]) == _round_half_up(pub["mask"]), (recipe, m[2], pub)
    v = {k: value for k, (value, _) in exp["values"].items()}
    gpus, text = v["gpus"], h.replace("\n", " ")
    if gpus is None:  # the source does not state how its batch was split
        assert f"Training: {v['images_per_batch']} images per iteration" in text, recipe
        return
    per_gpu = v.get("images_per_gpu") or v["images_per_batch"] // gpus
    assert re.search(rf"Training: {gpus} GPUs x {per_gpu} images", text), recipe
    if gpus != 8:
        assert f"--num-gpus {gpus}" in text, recipe


# ------------------------------------------------------------------------------ built models
def _norm_classes():
    from d2norm.layers import (
        CrossIterationBatchNorm2d,
        FrozenStatisticsBatchNorm2d,
        GroupNorm,
        GroupNormWS,
        MovingAverageBatchNorm2d,
        SyncBatchNorm2d,
    )

    from detectron2.layers import FrozenBatchNorm2d

    return {
        "": None,
        "FrozenBN": FrozenBatchNorm2d,
        "BN": nn.BatchNorm2d,
        "SyncBN": SyncBatchNorm2d,
        "GN": GroupNorm,
        "GN+WS": GroupNormWS,
        "CBN": CrossIterationBatchNorm2d,
        "MABN": MovingAverageBatchNorm2d,
        "FrozenStatsBN": FrozenStatisticsBatchNorm2d,
    }


# norms detectron2's freeze (and d2norm's preparation pass) turn into FrozenBN in frozen stages
_FROZEN_TO_FROZENBN = {"FrozenBN", "BN", "SyncBN", "CBN", "MABN", "FrozenStatsBN"}


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_built_model_has_the_official_norm_at_every_site(name):
    """One model per experiment's first recipe: the class of the norm at every call site is the
    translation of the official norm of that site (FrozenBN in frozen stages)."""
    classes = _norm_classes()
    exp = EXPERIMENTS[name]
    want = expected_config(exp)
    model = built_model(load(exp["recipes"][0]))
    freeze_at = want["MODEL.BACKBONE.FREEZE_AT"]
    site_norm = {
        "fpn": want["MODEL.FPN.NORM"],
        "box_head": want["MODEL.ROI_BOX_HEAD.NORM"],
        "mask_head": want.get("MODEL.ROI_MASK_HEAD.NORM"),
    }
    counts = {}
    for site, conv in call_sites(model):
        if site == "mask_head" and site_norm["mask_head"] is None:
            continue  # Faster R-CNN: checked on its Mask R-CNN twin, whose mask head is not cited
        if site in STAGES:
            norm = want["MODEL.RESNETS.NORM"]
            if STAGES.index(site) < freeze_at and norm in _FROZEN_TO_FROZENBN:
                norm = "FrozenBN"
        else:
            norm = site_norm[site]
        got = getattr(conv, "norm", None)
        expected_cls = classes[norm]
        assert (got is None) if expected_cls is None else type(got) is expected_cls, (
            f"{name}: {site} conv has {type(got).__name__}, official {norm or 'no norm'}"
        )
        counts[site] = counts.get(site, 0) + 1
    assert counts.get("box_head", 0) == want["MODEL.ROI_BOX_HEAD.NUM_CONV"]
    if want.get("MODEL.ROI_MASK_HEAD.NUM_CONV"):
        assert counts["mask_head"] == want["MODEL.ROI_MASK_HEAD.NUM_CONV"]
