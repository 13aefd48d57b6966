"""Whole detectors of the official CBN and MABN checkpoints under detectron2's names.

Layouts (keys after d2norm's loader has unwrapped ``state_dict`` / ``model`` and ``module.``):

* ``mmdet``, the official CBN code (Howal/Cross-iterationBatchNorm: an mmdetection 0.6 fork, the
  key layout of mmdetection v1.x): ``neck.lateral_convs.{i}.conv`` / ``.bn`` (``.gn``),
  ``neck.fpn_convs.{i}``; ``rpn_head.rpn_conv`` / ``rpn_cls`` / ``rpn_reg``;
  ``bbox_head.shared_convs.{i}.conv`` / ``.bn``, ``bbox_head.shared_fcs.{i}``, ``fc_cls``,
  ``fc_reg``; ``mask_head.convs.{i}.conv`` / ``.bn``, ``mask_head.upsample``, ``conv_logits``.
* ``maskrcnn_benchmark``, the official MABN code (megvii-model/MABN ``det/``):
  ``backbone.fpn.fpn_inner{i}`` / ``fpn_layer{i}`` (``.0`` conv and ``.1`` norm when normalized);
  ``rpn.head.conv`` / ``cls_logits`` / ``bbox_pred``, ``rpn.anchor_generator.cell_anchors.{l}``;
  ``roi_heads.box.feature_extractor.xconvs.{j}`` (conv, norm, ReLU, ...), ``fc6`` / ``fc7``,
  ``roi_heads.box.predictor.cls_score`` / ``bbox_pred``;
  ``roi_heads.mask.feature_extractor.mask_fcn{i}`` (``.0`` / ``.1`` when normalized),
  ``roi_heads.mask.predictor.conv5_mask`` / ``mask_fcn_logits``.

What differs from detectron2, and how it is mapped:

* **Class order.** Both code bases classify K+1 classes with background at index 0 (mmdetection
  0.6 / v1 ``num_classes=81``; maskrcnn-benchmark ``NUM_CLASSES 81``); detectron2 puts background
  last (index K). ``cls_score`` rows become ``(1, ..., K, 0)``; the softmax over them gives each
  class the source's probability. The COCO categories are in the same (sorted id) order in all
  three code bases.
* **Box regression.** Class-specific: rows ``4c .. 4c+3`` hold ``(dx, dy, dw, dh)`` of class c in
  all three; the background's 4 rows are dropped (detectron2 predicts K boxes; a class-agnostic
  head keeps its one box: mmdetection's 4 rows, maskrcnn-benchmark's foreground rows 4-7).
  Encodings: mmdetection divides the deltas by ``target_stds (0.1, 0.1, 0.2, 0.2)``
  (``mmdet/core/bbox/transforms.py``), maskrcnn-benchmark multiplies by ``BBOX_REG_WEIGHTS
  (10, 10, 5, 5)``: detectron2's ``MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS (10, 10, 5, 5)``. RPN:
  ``(1, 1, 1, 1)`` in all three. Both sources decode with "+1" widths of pixel-index boxes; for
  the same box in continuous coordinates (``x2 + 1``) that is detectron2's decoding.
* **RPN objectness.** Sigmoid with one channel per anchor in all the official files. An
  mmdetection softmax RPN (``use_sigmoid_cls=False``: two channels per anchor, channel ``2a + k``,
  k = 1 the object) becomes the logit ``z_1 - z_0`` (``sigmoid(z_1 - z_0) = softmax(z)_1``).
  Anchors per location are ordered by aspect ratio (0.5, 1, 2) in all three; deltas are the 4
  channels ``4a .. 4a+3`` of anchor a.
* **Anchors.** The sources' anchors are centered at ``(stride - 1) / 2`` in pixel-index
  coordinates, ``stride / 2`` in continuous ones: detectron2's ``MODEL.ANCHOR_GENERATOR.OFFSET
  0.5`` (its recipes use 0.0). Their sizes are rounded to whole pixels (maskrcnn-benchmark, as
  Detectron, rounds at the base size and scales up), which detectron2 cannot reproduce: the
  corner difference is measured for the converted model and reported (``anchor_residual_px``).
* **FPN.** Levels in increasing stride in both (mmdetection's index i and maskrcnn-benchmark's
  ``fpn_inner{i+1}`` are ``res{i+2}``); P6 is a stride-2 max-pool of P5 in all three. Extra FPN
  convs (mmdetection ``add_extra_convs``, RetinaNet) have no place in detectron2's R-CNN FPN and
  are refused.
* **Heads.** Shared convs then fcs, features flattened as ``(C, H, W)`` in all three;
  mmdetection's separate classification / regression branches (``cls_convs``, ``reg_fcs``, ...)
  have no detectron2 counterpart and are refused. Mask logits: channel 0 (background) dropped.

Not representable in detectron2 (sub-pixel, listed in the report): the sources' "+1" box
widths in the ROI level assignment and NMS, and maskrcnn-benchmark's ROIAlign box end (no +1).
"""

import math
import re

import torch

__all__ = [
    "DETECTOR_PARTS",
    "DETECTOR_SOURCES",
    "detector_parts",
    "rename_detector",
    "source_prefixes",
    "check_file_anchors",
    "source_settings",
    "check_detector_settings",
    "legacy_cell_anchors",
    "anchor_residual_px",
]

#: Parts of a detector a file can provide besides the backbone, with the model's key prefixes.
DETECTOR_PARTS = {
    "fpn": ("backbone.fpn_",),
    "rpn": ("proposal_generator.",),
    "roi_heads": ("roi_heads.",),
}
_SOURCE_PREFIXES = {
    "mmdet": {"fpn": ("neck.",), "rpn": ("rpn_head.",), "roi_heads": ("bbox_head.", "mask_head.")},
    "maskrcnn_benchmark": {
        "fpn": ("backbone.fpn.",),
        "rpn": ("rpn.",),
        "roi_heads": ("roi_heads.box.", "roi_heads.mask."),
    },
}
DETECTOR_SOURCES = tuple(_SOURCE_PREFIXES)

# The official configs' anchors (CBN: anchor_scales=[8] x anchor_strides [4, ..., 64];
# maskrcnn-benchmark defaults ANCHOR_SIZES (32, ..., 512), ANCHOR_STRIDE (4, ..., 64)) and
# ratios (0.5, 1, 2), pooling (RoIAlign out 7 / 14, sample_num / POOLER_SAMPLING_RATIO 2).
_STRIDES = (4, 8, 16, 32, 64)
_SIZES = (32, 64, 128, 256, 512)
_RATIOS = (0.5, 1.0, 2.0)
_SETTINGS = {
    "rpn": (
        ("MODEL.ANCHOR_GENERATOR.SIZES", [[s] for s in _SIZES]),
        ("MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", [list(_RATIOS)]),
        ("MODEL.ANCHOR_GENERATOR.OFFSET", 0.5),
        ("MODEL.RPN.BBOX_REG_WEIGHTS", [1.0, 1.0, 1.0, 1.0]),
    ),
    "roi_heads": (
        ("MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS", [10.0, 10.0, 5.0, 5.0]),
        ("MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", 7),
        ("MODEL.ROI_BOX_HEAD.POOLER_TYPE", "ROIAlign"),
        ("MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO", 2),
        ("MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION", 14),
        ("MODEL.ROI_MASK_HEAD.POOLER_TYPE", "ROIAlign"),
        ("MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO", 2),
    ),
}


def detector_parts(state_dict, source):
    """The detector parts (of :data:`DETECTOR_PARTS`) that ``state_dict`` holds, in order."""
    prefixes = _SOURCE_PREFIXES.get(source, {})
    return tuple(p for p in DETECTOR_PARTS if any(k.startswith(prefixes.get(p, ())) for k in state_dict))


def source_settings(parts):
    """``[(config key, value)]`` under which detectron2 computes what the source computed with
    the converted ``parts`` (anchors, box encodings, ROI pooling of the official configs)."""
    return [kv for part in DETECTOR_PARTS if part in parts for kv in _SETTINGS.get(part, ())]


def _same(have, want):
    if isinstance(want, (list, tuple)):
        have = list(have) if isinstance(have, (list, tuple)) else [have]
        return len(have) == len(want) and all(_same(h, w) for h, w in zip(have, want))
    if isinstance(want, str):
        return have == want
    try:
        return abs(float(have) - float(want)) < 1e-6
    except (TypeError, ValueError):
        return False


def check_detector_settings(cfg, source, parts):
    """Raise ``ValueError`` if ``cfg`` computes the converted ``parts`` otherwise than the source
    did (:func:`source_settings`), naming each key, both values and the overrides to add."""
    bad = []
    for key, want in source_settings(parts):
        node = cfg
        for name in key.split("."):
            node = node[name]
        if not _same(node, want):
            bad.append((key, node, want))
    if bad:
        found = "; ".join(f"{k} is {have!r}, the {source} detector used {want!r}" for k, have, want in bad)
        fix = " ".join(f"{k} {_cli_value(want)}" for k, _, want in bad)
        raise ValueError(
            f"The recipe computes the converted {'/'.join(parts)} otherwise than the {source} "
            f"checkpoint was trained and evaluated: {found}. Fix: add these overrides when converting "
            f"and when evaluating the converted file ({fix}; tools/convert_weights.py --match-source "
            "adds them), or convert only the backbone (--parts backbone)."
        )


def _cli_value(value):
    text = repr(value) if isinstance(value, (list, tuple)) else str(value)
    return f'"{text}"' if " " in text else text


# ---------------------------------------------------------------------------------------------
# renaming


# source module -> (detectron2 module, kind): the classifier, box regressor, mask deconv and
# mask logits, each a weight and a bias
_MMDET_PREDICTORS = {
    "bbox_head.fc_cls.": ("roi_heads.box_predictor.cls_score.", "cls"),
    "bbox_head.fc_reg.": ("roi_heads.box_predictor.bbox_pred.", "box"),
    "mask_head.upsample.": ("roi_heads.mask_head.deconv.", "roi_heads"),
    "mask_head.conv_logits.": ("roi_heads.mask_head.predictor.", "mask"),
}
_MRCNN_PREDICTORS = {
    "roi_heads.box.predictor.cls_score.": ("roi_heads.box_predictor.cls_score.", "cls"),
    "roi_heads.box.predictor.bbox_pred.": ("roi_heads.box_predictor.bbox_pred.", "box"),
    "roi_heads.mask.predictor.conv5_mask.": ("roi_heads.mask_head.deconv.", "roi_heads"),
    "roi_heads.mask.predictor.mask_fcn_logits.": ("roi_heads.mask_head.predictor.", "mask"),
}


def _predictor_name(key, table):
    for src, (dst, kind) in table.items():
        if key.startswith(src) and key[len(src) :] in ("weight", "bias"):
            return dst + key[len(src) :], kind
    return None, None


def _fpn_name(lateral, level, is_norm, leaf):
    kind = "fpn_lateral" if lateral else "fpn_output"
    return f"backbone.{kind}{level}.{'norm.' if is_norm else ''}{leaf}", "fpn"


def _mmdet_name(key):
    """``(detectron2 name, kind)`` of an mmdetection detector key, or ``(None, None)`` for a key
    with no detectron2 counterpart (:func:`rename_detector` refuses those)."""
    m = re.match(r"^neck\.(lateral_convs|fpn_convs)\.(\d+)\.(conv|bn|gn)\.(.+)$", key)
    if m:  # level i is res{i+2}
        return _fpn_name(m.group(1) == "lateral_convs", int(m.group(2)) + 2, m.group(3) != "conv", m.group(4))
    m = re.match(r"^rpn_head\.rpn_(conv|cls|reg)\.(weight|bias)$", key)
    if m:
        name = {"conv": "conv", "cls": "objectness_logits", "reg": "anchor_deltas"}[m.group(1)]
        return f"proposal_generator.rpn_head.{name}.{m.group(2)}", "rpn_" + m.group(1)
    m = re.match(r"^(bbox_head\.shared_convs|mask_head\.convs)\.(\d+)\.(conv|bn|gn)\.(.+)$", key)
    if m:
        head = "box_head.conv" if m.group(1).startswith("bbox") else "mask_head.mask_fcn"
        norm = "" if m.group(3) == "conv" else "norm."
        return f"roi_heads.{head}{int(m.group(2)) + 1}.{norm}{m.group(4)}", "roi_heads"
    m = re.match(r"^bbox_head\.shared_fcs\.(\d+)\.(weight|bias)$", key)
    if m:
        return f"roi_heads.box_head.fc{int(m.group(1)) + 1}.{m.group(2)}", "roi_heads"
    return _predictor_name(key, _MMDET_PREDICTORS)


def _mrcnn_name(key, box_convs):
    """As :func:`_mmdet_name`, for maskrcnn-benchmark keys (``box_convs``: ``{xconvs index:
    (conv number, is_norm)}`` of the box head's conv stack)."""
    m = re.match(r"^backbone\.fpn\.(fpn_inner|fpn_layer)(\d+)\.(?:(0|1)\.)?(.+)$", key)
    if m:  # fpn_inner{i} is res{i+1}; Sequential(conv, norm) when normalized
        return _fpn_name(m.group(1) == "fpn_inner", int(m.group(2)) + 1, m.group(3) == "1", m.group(4))
    m = re.match(r"^rpn\.head\.(conv|cls_logits|bbox_pred)\.(weight|bias)$", key)
    if m:
        name, kind = {
            "conv": ("conv", "rpn_conv"),
            "cls_logits": ("objectness_logits", "rpn_cls"),
            "bbox_pred": ("anchor_deltas", "rpn_reg"),
        }[m.group(1)]
        return f"proposal_generator.rpn_head.{name}.{m.group(2)}", kind
    if re.match(r"^rpn\.anchor_generator\.cell_anchors\.\d+$", key):
        return "", "anchors"
    m = re.match(r"^roi_heads\.box\.feature_extractor\.xconvs\.(\d+)\.(.+)$", key)
    if m and int(m.group(1)) in box_convs:
        number, is_norm = box_convs[int(m.group(1))]
        return f"roi_heads.box_head.conv{number}.{'norm.' if is_norm else ''}{m.group(2)}", "roi_heads"
    m = re.match(r"^roi_heads\.box\.feature_extractor\.fc(\d+)\.(weight|bias)$", key)
    if m and int(m.group(1)) >= 6:
        return f"roi_heads.box_head.fc{int(m.group(1)) - 5}.{m.group(2)}", "roi_heads"
    m = re.match(r"^roi_heads\.mask\.feature_extractor\.mask_fcn(\d+)\.(?:(0|1)\.)?(.+)$", key)
    if m:
        norm = "norm." if m.group(2) == "1" else ""
        return f"roi_heads.mask_head.mask_fcn{int(m.group(1))}.{norm}{m.group(3)}", "roi_heads"
    return _predictor_name(key, _MRCNN_PREDICTORS)


def _box_conv_numbers(state_dict):
    """``{index: (conv number, is_norm)}`` of maskrcnn-benchmark's ``xconvs`` Sequential: a
    4-d ``weight`` is a conv (numbered from 1), anything else belongs to the norm after it."""
    prefix = "roi_heads.box.feature_extractor.xconvs."
    indices = sorted({int(k[len(prefix) :].split(".")[0]) for k in state_dict if k.startswith(prefix)})
    out, number = {}, 0
    for i in indices:
        weight = state_dict.get(f"{prefix}{i}.weight")
        if weight is not None and weight.dim() == 4:
            number += 1
            out[i] = (number, False)
        elif number:
            out[i] = (number, True)
    return out


def _background_last(value):
    """Rows ``(1, ..., K, 0)`` of a ``(K+1, ...)`` classifier tensor."""
    return torch.cat([value[1:], value[:1]])


def _without_background_boxes(value, num_rows):
    """The class boxes of a ``(4 (K+1), ...)`` regressor: rows of class 0 (background) dropped;
    a class-agnostic ``(4, ...)`` regressor is kept."""
    if value.shape[0] == 4:
        return value
    if value.shape[0] != 4 * num_rows:
        raise ValueError(
            f"box regressor with {value.shape[0]} rows for a classifier of {num_rows} classes "
            f"(expected 4 x {num_rows} class-specific rows or 4 class-agnostic ones)"
        )
    return value[4:]


def _rpn_objectness(value, num_anchors):
    """A sigmoid RPN's ``(A, ...)`` objectness, from ``A`` sigmoid channels (as is) or ``2A``
    softmax channels (``2a + k``, k = 1 object): ``z_1 - z_0``."""
    if value.shape[0] == num_anchors:
        return value
    if value.shape[0] == 2 * num_anchors:
        return value[1::2] - value[0::2]
    raise ValueError(
        f"RPN objectness with {value.shape[0]} channels for {num_anchors} anchors per location "
        f"(expected {num_anchors} sigmoid channels or {2 * num_anchors} softmax ones)"
    )


def source_prefixes(source, parts):
    """The key prefixes of ``parts`` in a ``source`` file."""
    return tuple(p for part in parts for p in _SOURCE_PREFIXES[source][part])


def rename_detector(state_dict, source, parts):
    """``(converted, anchors, origin)``: the ``parts`` of ``state_dict`` (a ``source`` file)
    under detectron2's names, with the class, box and objectness layouts converted (module
    docstring); the file's RPN cell anchors by level (maskrcnn-benchmark keeps them, ``{}``
    otherwise); and the file's key of each converted one.

    Raises ``ValueError`` naming the keys of a part that has no detectron2 counterpart."""
    box_convs = _box_conv_numbers(state_dict) if source == "maskrcnn_benchmark" else {}
    prefixes = _SOURCE_PREFIXES[source]
    named, unmapped, anchors = {}, [], {}
    for key, value in state_dict.items():
        part = next((p for p in parts if key.startswith(prefixes[p])), None)
        if part is None or key.endswith("num_batches_tracked"):
            continue
        new, kind = _mmdet_name(key) if source == "mmdet" else _mrcnn_name(key, box_convs)
        if kind == "anchors":
            anchors[int(key.rsplit(".", 1)[1])] = value
        elif new is None:
            unmapped.append(key)
        else:
            named[new] = (kind, value, key)
    if unmapped:
        raise ValueError(
            f"{len(unmapped)} {source} tensors of the converted parts have no counterpart in "
            f"detectron2's R-CNN ({sorted(unmapped)[:8]}): e.g. separate classification / "
            "regression branches (cls_convs, reg_fcs), extra FPN convs of a RetinaNet-style neck, "
            "or a head detectron2 does not build. Fix: convert the other parts only (--parts)."
        )
    extra = sorted(k for k in named if re.match(r"^backbone\.fpn_output([6-9]|\d\d)\.", k))
    if extra:
        raise ValueError(
            f"The file's FPN has extra convs ({sorted(named[k][2] for k in extra)[:8]}): P6 from a conv "
            "(mmdetection add_extra_convs, RetinaNet). Detectron2's R-CNN FPN makes P6 by "
            "max-pooling P5, so these cannot be mapped. Fix: --parts backbone."
        )
    num_rows = {v.shape[0] for kind, v, _ in named.values() if kind == "cls"}
    num_anchors = {v.shape[0] // 4 for kind, v, _ in named.values() if kind == "rpn_reg"}
    converted, origin = {}, {}
    for new, (kind, value, key) in named.items():
        try:
            if kind == "cls":
                value = _background_last(value)
            elif kind == "box" and num_rows:
                value = _without_background_boxes(value, max(num_rows))
            elif kind == "mask" and num_rows and value.shape[0] == max(num_rows):
                value = value[1:]
            elif kind == "rpn_cls" and num_anchors:
                value = _rpn_objectness(value, max(num_anchors))
        except ValueError as e:
            raise ValueError(f"{key}: {e}") from None
        converted[new] = value
        origin[new] = key
    return converted, anchors, origin


# ---------------------------------------------------------------------------------------------
# anchors


def legacy_cell_anchors(source, stride, size, ratios=_RATIOS):
    """The ``(A, 4)`` anchors at the first location of a level, in the source's pixel-index
    coordinates (box width ``x2 - x1 + 1``), by the source's generator:

    * ``mmdet`` (mmdetection 0.6 / v1 ``AnchorGenerator``, base size = stride, scale =
      size / stride): ``w = stride * scale / sqrt(r)``, ``h = stride * scale * sqrt(r)``, corners
      ``c -/+ (w - 1) / 2`` with ``c = (stride - 1) / 2``, rounded;
    * ``maskrcnn_benchmark`` (Detectron's ``generate_anchors``): ``w0 = round(sqrt(stride^2 /
      r))``, ``h0 = round(w0 r)`` at the base size, then scaled by ``size / stride``, corners
      ``c -/+ (w - 1) / 2``.
    """
    r = torch.tensor(ratios, dtype=torch.float64)
    ctr = 0.5 * (stride - 1)
    scale = size / stride
    if source == "mmdet":
        ws = stride * scale / r.sqrt()
        hs = stride * scale * r.sqrt()
        boxes = torch.stack(
            [ctr - 0.5 * (ws - 1), ctr - 0.5 * (hs - 1), ctr + 0.5 * (ws - 1), ctr + 0.5 * (hs - 1)], 1
        )
        return boxes.round()
    ws = torch.round(torch.sqrt(stride * stride / r))
    hs = torch.round(ws * r)
    ws, hs = ws * scale, hs * scale
    return torch.stack(
        [ctr - 0.5 * (ws - 1), ctr - 0.5 * (hs - 1), ctr + 0.5 * (ws - 1), ctr + 0.5 * (hs - 1)], 1
    )


def _continuous(boxes):
    """Pixel-index boxes (``x2`` inclusive) in continuous coordinates (``x2 + 1``)."""
    return boxes + torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=boxes.dtype)


def check_file_anchors(anchors):
    """Raise ``ValueError`` unless a maskrcnn-benchmark file's cell anchors are those of the
    official settings (sizes 32-512 at strides 4-64, ratios 0.5, 1, 2) that the converted RPN is
    evaluated with."""
    for level, (stride, size) in enumerate(zip(_STRIDES, _SIZES)):
        want = legacy_cell_anchors("maskrcnn_benchmark", stride, size)
        have = anchors.get(level)
        if (
            have is None
            or tuple(have.shape) != tuple(want.shape)
            or not torch.allclose(have.double(), want, atol=1e-3)
        ):
            raise ValueError(
                f"rpn.anchor_generator.cell_anchors.{level} of the file is "
                f"{None if have is None else have.tolist()}, not the anchors of size {size} at "
                f"stride {stride}, ratios {list(_RATIOS)} ({want.tolist()}): the RPN was trained "
                "with other anchors than the official settings. Fix: convert without the RPN "
                "(--parts backbone,fpn,roi_heads)."
            )


def anchor_residual_px(model, source):
    """The largest corner difference in pixels between the anchors ``model`` generates at each
    level and the source's anchors (continuous coordinates)."""
    generator = model.proposal_generator.anchor_generator
    worst = 0.0
    for cell, stride, size in zip(generator.cell_anchors, generator.strides, _SIZES):
        mine = cell.double() + generator.offset * stride
        theirs = _continuous(legacy_cell_anchors(source, stride, size))
        if mine.shape != theirs.shape:
            return math.inf
        worst = max(worst, float((mine - theirs).abs().max()))
    return worst
