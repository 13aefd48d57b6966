"""Converting pretrained files from other code bases into the layouts d2norm's recipes load.

:func:`convert_weights` reads a file with d2norm's own loader (:class:`D2NormCheckpointer`: ``.pkl``
of Detectron / detectron2, torch files, ``state_dict`` / ``model`` / ``module.`` wrappers),
renames its keys from the source's layout to detectron2's, loads them into the model the recipe
builds (every check of :mod:`d2norm.weights` applies: a file whose backbone keys or shapes do not
fit is refused with the keys it found), checks the recipe's input format against the one the
weights were trained with, and returns the loaded tensors under the model's own names.

Sources (``source=``; ``"auto"`` tells them apart by their keys):

========================  ===================================================  ================
source                    layout (keys)                                        trained on input
========================  ===================================================  ================
``torchvision``           ``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.   RGB, ImageNet
                          downsample.0/1``, ``fc`` (also the WS authors' files)  mean / std
``timm``                  torchvision's names (``resnet50_gn``: GroupNorm in     RGB, ImageNet
                          the ``bn*`` slots); ResNetV2 / BiT (``stem.conv``,     mean / std
                          ``stages.*``, pre-activation) is refused
``detectron2``            Detectron / detectron2 ``.pkl`` (Caffe2 names, e.g.   BGR, mean
                          ``res2_0_branch2a_w``), matched by detectron2's       [103.53, 116.28,
                          heuristics                                           123.675], std 1
``mmdet`` (official CBN)  ``{"state_dict"}``: ``backbone.`` + torchvision's     RGB, ImageNet
                          names, ``neck.*``, ``rpn_head.*``, ``bbox_head.*``    mean / std
``maskrcnn_benchmark``    ``{"model"}``: ``module.backbone.body.stem.conv1``,   BGR, mean
(official MABN)           ``stem.bn1``, ``layer1.0.*``; ``backbone.fpn.*``,     [102.9801,
                          ``rpn.*``, ``roi_heads.*``                             115.9465,
                                                                               122.7717], std 1
``mabn`` (MABN authors'   torchvision's names (``R50-wc.pth``); not told apart   as
ImageNet backbones)       from torchvision by keys: pass it explicitly           maskrcnn_benchmark
========================  ===================================================  ================

The backbone is converted from every source. The detector parts of mmdet / maskrcnn-benchmark
files (FPN, RPN, box and mask heads; ``parts=``) are converted too, by
:mod:`d2norm.convert_detector` (class order, box and objectness layouts), when the recipe builds
the same architecture; the recipe must then compute them as the source did (anchors, box
encodings, ROI pooling: :func:`~d2norm.convert_detector.source_settings`), or the conversion is
refused naming the keys to set. Every tensor of a converted part must fit the model and every
parameter and running statistic of the model's part must come from the file; norm history and
counters the sources do not save (CBN's window, its burn-in count) start empty.
"""

import os
import tempfile

import torch

from .checkpoint import D2NormCheckpointer, load_pretrained_backbone
from .convert_detector import (
    DETECTOR_PARTS,
    DETECTOR_SOURCES,
    anchor_residual_px,
    check_detector_settings,
    check_file_anchors,
    detector_parts,
    rename_detector,
    source_prefixes,
    source_settings,
)
from .layers.weight_transforms import remap_parametrized_keys
from .norms import norm_layer_types
from .weights import CheckpointError, convert_torchvision_resnet, is_torchvision_resnet

__all__ = [
    "SOURCES",
    "INPUT_CONVENTIONS",
    "detect_source",
    "rename_backbone",
    "check_input_format",
    "convert_weights",
    "PARTS",
]

#: What ``convert_weights(parts=...)`` can convert; the backbone always is.
PARTS = ("backbone",) + tuple(DETECTOR_PARTS)

_IMAGENET_RGB = {
    "INPUT.FORMAT": "RGB",
    "MODEL.PIXEL_MEAN": [123.675, 116.280, 103.530],
    "MODEL.PIXEL_STD": [58.395, 57.120, 57.375],
    "MODEL.RESNETS.STRIDE_IN_1X1": False,
}
_MRCNN_BENCHMARK_BGR = {
    "INPUT.FORMAT": "BGR",
    "MODEL.PIXEL_MEAN": [102.9801, 115.9465, 122.7717],
    "MODEL.PIXEL_STD": [1.0, 1.0, 1.0],
    "MODEL.RESNETS.STRIDE_IN_1X1": True,
}
#: The input each source's weights were trained with (config keys and values).
INPUT_CONVENTIONS = {
    "torchvision": _IMAGENET_RGB,
    "timm": _IMAGENET_RGB,
    "mmdet": _IMAGENET_RGB,
    "detectron2": {"INPUT.FORMAT": "BGR", "MODEL.PIXEL_MEAN": [103.530, 116.280, 123.675]},
    "maskrcnn_benchmark": _MRCNN_BENCHMARK_BGR,
    # the MABN authors' weight-centralized ImageNet backbones (R50-wc.pth): torchvision's names,
    # maskrcnn-benchmark's input; not told apart from torchvision by keys: pass source="mabn"
    "mabn": _MRCNN_BENCHMARK_BGR,
}
SOURCES = tuple(INPUT_CONVENTIONS)
_BACKBONE = "backbone.bottom_up."


def _read(path):
    """The file's tensors by name, read by d2norm's checkpoint loader (which also unwraps
    containers and strips ``module.``); ``(state_dict, checkpoint)``."""
    checkpoint = D2NormCheckpointer(torch.nn.Module(), save_to_disk=False)._load_file(path)
    return dict(checkpoint["model"]), checkpoint


def detect_source(state_dict, checkpoint=None, path=""):
    """The source layout of ``state_dict`` (see the module docstring), or a ``CheckpointError``
    listing the keys found."""
    keys = list(state_dict)
    if (checkpoint or {}).get("__author__") == "Caffe2" or str(path).endswith(".pkl"):
        return "detectron2"
    if (checkpoint or {}).get("__author__") == "torchvision":  # already renamed by the loader
        return "timm" if not any(k.endswith("running_mean") for k in keys) else "torchvision"
    if any(k.startswith("backbone.body.") for k in keys):
        return "maskrcnn_benchmark"
    if any(k.startswith("backbone.layer1.") for k in keys):
        return "mmdet"
    if any(k.startswith(("stages.", "stem.conv.")) for k in keys):
        raise CheckpointError(
            f"{path!r} is a pre-activation ResNetV2 / BiT layout (stem.conv, stages.*: e.g. timm's "
            "resnetv2_*), which detectron2's ResNet (post-activation) cannot load. Fix: use a "
            "post-activation ResNet (torchvision / timm resnet*, e.g. timm resnet50_gn)."
        )
    if is_torchvision_resnet(state_dict):
        return "torchvision"
    raise CheckpointError(
        f"Unrecognized weights layout in {path!r}: {len(keys)} tensors, e.g. {sorted(keys)[:8]}. "
        f"Fix: pass a file of one of the sources {list(SOURCES)} (docs/weights.md)."
    )


def _source_resnet_name(key, source):
    """A key's torchvision-style (or already detectron2) ResNet name, or None if not backbone."""
    if source == "mmdet":
        return key[len("backbone.") :] if key.startswith("backbone.") else None
    if source == "maskrcnn_benchmark":
        body = "backbone.body."
        if not key.startswith(body):
            return None
        rest = key[len(body) :]
        for old, new in (("stem.bn1.", "bn1."), ("stem.conv1.", "conv1.")):
            if rest.startswith(old):
                return new + rest[len(old) :]
        return rest
    return key


def rename_backbone(state_dict, source):
    """``(backbone, other)``: the backbone tensors under detectron2's ``backbone.bottom_up.`` names,
    and the file's keys that are not backbone (classifier, FPN, heads), sorted."""
    backbone, other = {}, []
    for key, value in state_dict.items():
        name = _source_resnet_name(key, source)
        renamed = convert_torchvision_resnet({name: value}) if name is not None else {}
        (new,) = renamed or (None,)
        if new is not None and new.startswith(("stem.", "res2.", "res3.", "res4.", "res5.")):
            backbone[_BACKBONE + new] = value
        elif not key.endswith("num_batches_tracked"):
            other.append(key)
    return backbone, sorted(other)


def check_input_format(cfg, source):
    """Raise ``ValueError`` if ``cfg``'s input format differs from the one the ``source``'s weights
    were trained with (:data:`INPUT_CONVENTIONS`), naming each key and the value to set."""
    bad = []
    for key, want in INPUT_CONVENTIONS[source].items():
        node = cfg
        for part in key.split("."):
            node = node[part]
        have = list(node) if isinstance(want, list) else node
        same = (
            len(have) == len(want) and all(abs(float(a) - float(b)) < 1e-2 for a, b in zip(have, want))
            if isinstance(want, list)
            else have == want
        )
        if not same:
            bad.append(f"{key} is {have}, the weights expect {want}")
    if bad:
        raise ValueError(
            f"The recipe's input format does not match the {source} weights: {'; '.join(bad)}. Fix: "
            "set these keys (channel order and normalization the weights were trained with), or "
            "use weights trained with this input format."
        )


def _parts(parts, available, source, path):
    """The detector parts to convert: ``available`` ones for ``None``, else ``parts`` checked."""
    if parts is None:
        return tuple(available)
    parts = tuple(
        dict.fromkeys(p.strip() for p in ([parts] if isinstance(parts, str) else parts) if p.strip())
    )
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"Unknown parts {unknown}. Fix: a subset of {list(PARTS)}.")
    missing = [p for p in parts if p != "backbone" and p not in available]
    if missing and source not in DETECTOR_SOURCES:
        raise CheckpointError(
            f"{path!r} is a {source} file: only its backbone is converted, not {missing}. Fix: "
            "--parts backbone (a whole Detectron / detectron2 detector loads through "
            "MODEL.WEIGHTS as it is)."
        )
    if missing:
        raise CheckpointError(
            f"{path!r} ({source}) holds only {['backbone', *available]}, not {missing}. Fix: "
            "--parts with what the file holds."
        )
    return tuple(p for p in DETECTOR_PARTS if p in parts)


def _restartable(model):
    """Model keys a source file need not provide: norm buffers other than running statistics
    (CBN history and iteration count, MABN ring buffers, ``num_batches_tracked``)."""
    out = set()
    for name, module in model.named_modules():
        if isinstance(module, norm_layer_types()):
            for leaf, _ in module.named_buffers(recurse=False):
                if leaf not in ("running_mean", "running_var", "weight", "bias"):
                    out.add(f"{name}.{leaf}")
    return out


def _fresh_norm_state(model, report, parts):
    """The model's norm buffers in the converted ``parts`` that the file did not fill."""
    prefixes = tuple(p for part in parts for p in DETECTOR_PARTS[part])
    loaded = set(report.loaded)
    return sorted(k for k in _restartable(model) if k.startswith(prefixes) and k not in loaded)


def _check_detector_fit(model, path, converted, report, parts, origin):
    """Raise ``CheckpointError`` unless every converted tensor was loaded and the model's
    converted parts got every parameter and running statistic from the file."""
    model_sd = model.state_dict()
    loaded = set(report.loaded)
    restartable = _restartable(model)
    misfits = []
    for key, value in converted.items():
        if key in loaded or (key in restartable and key in model_sd):
            continue  # history of another size restarts (d2norm.weights.adapt_method_state)
        have = model_sd.get(key)
        where = "no such tensor in the model" if have is None else f"model {tuple(have.shape)}"
        misfits.append(f"{origin.get(key, key)} -> {key}: file {tuple(value.shape)}, {where}")
    prefixes = tuple(p for part in parts for p in DETECTOR_PARTS[part])
    missing = sorted(
        k for k in model_sd if k.startswith(prefixes) and k not in loaded and k not in restartable
    )
    if misfits or missing:
        lines = "; ".join(misfits[:8]) + (f" ... ({len(misfits) - 8} more)" if len(misfits) > 8 else "")
        lack = (
            f"; the model's {len(missing)} tensors the file does not provide: {missing[:8]}"
            if missing
            else ""
        )
        raise CheckpointError(
            f"The {'/'.join(parts)} of {path!r} do not fit this recipe's model: {lines}{lack}. "
            "The file's detector has another architecture (norm in FPN / heads, number of head "
            "convs or fcs, channels, classes, anchors per location). Fix: use the recipe whose "
            "MODEL.FPN.NORM, ROI_BOX_HEAD (NORM, NUM_CONV, NUM_FC, CONV_DIM, FC_DIM), "
            "ROI_MASK_HEAD (NORM, NUM_CONV) and ROI_HEADS.NUM_CLASSES match the file, or convert "
            "fewer parts (--parts backbone)."
        )


def convert_weights(cfg, path, source="auto", check_input=True, parts=None, check_settings=True):
    """Convert ``path`` for the model of ``cfg`` (see the module docstring).

    ``parts``: ``None`` for every part the file holds (backbone, and for mmdet /
    maskrcnn_benchmark files ``fpn``, ``rpn``, ``roi_heads``), or a subset of :data:`PARTS`
    (the backbone is always converted; the others of the file are then listed as not converted).
    ``check_settings``: refuse a recipe that computes the converted detector parts otherwise
    than the source (:func:`d2norm.convert_detector.check_detector_settings`).

    Returns ``(state_dict, report)``: the model's tensors loaded from the file (model names), and
    ``{"source", "parts", "loaded", "not_converted", "input", "settings", "approximations"}``.
    Raises ``CheckpointError`` for a file whose keys or shapes do not fit the recipe,
    ``ValueError`` for an input-format or settings mismatch.
    """
    from .modeling import build_model

    raw, checkpoint = _read(path)
    if source == "auto":
        source = detect_source(raw, checkpoint, path)
    elif source not in SOURCES:
        raise ValueError(f"Unknown source {source!r}. Fix: one of {list(SOURCES)} or 'auto'.")
    parts = _parts(parts, detector_parts(raw, source), source, path)
    if check_input:
        check_input_format(cfg, source)
    if parts and check_settings:
        check_detector_settings(cfg, source, parts)
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    converted, approximations = {}, []
    if source == "detectron2":
        not_converted = []
        load_from = path  # Caffe2 names: detectron2's matching heuristics, as MODEL.WEIGHTS does
        report = load_pretrained_backbone(model, load_from)
    else:
        backbone, not_converted = rename_backbone(raw, source)
        if not backbone:
            raise CheckpointError(
                f"No ResNet backbone tensors found in {path!r} as a {source} file ({len(raw)} "
                f"tensors, e.g. {sorted(raw)[:8]}). Fix: pass the matching --source."
            )
        origin = {}
        if parts:
            try:
                converted, anchors, origin = rename_detector(raw, source, parts)
                if "rpn" in parts and source == "maskrcnn_benchmark":
                    check_file_anchors(anchors)
            except ValueError as e:
                raise CheckpointError(f"{path!r}: {e}") from None
            model_keys = model.state_dict().keys()
            converted = remap_parametrized_keys(converted, model_keys)
            origin = remap_parametrized_keys(origin, model_keys)
            converted_prefixes = source_prefixes(source, parts)
            not_converted = [k for k in not_converted if not k.startswith(converted_prefixes)]
        with tempfile.TemporaryDirectory() as tmp:
            renamed = os.path.join(tmp, "renamed.pth")
            torch.save({"model": {**backbone, **converted}}, renamed)
            report = load_pretrained_backbone(model, renamed)
        # statistics a norm of the recipe does not keep (BN running_mean for MABN / GN) may go
        unused_backbone = [
            k
            for k in report.unused
            if k.startswith(_BACKBONE) and not k.endswith(("running_mean", "running_var"))
        ]
        if unused_backbone:
            raise CheckpointError(
                f"{len(unused_backbone)} backbone tensors of {path!r} have no place in this model "
                f"({unused_backbone[:8]}). The file is for another backbone. Fix: use weights of "
                "the backbone in MODEL.RESNETS, or change MODEL.RESNETS to match the file."
            )
        if parts:
            _check_detector_fit(model, path, converted, report, parts, origin)
            fresh = sorted({k.rsplit(".", 1)[1] for k in _fresh_norm_state(model, report, parts)})
            if fresh:
                burnin = ", CBN's burn-in count among them: fine-tuning from this file burns in again"
                approximations.append(
                    f"norm state starts fresh where the file has none or of another buffer size "
                    f"({', '.join(fresh)}"
                    f"{burnin if 'num_iterations' in fresh else ''})"
                )
            if "rpn" in parts:
                approximations.append(
                    f"anchors: detectron2's differ from the {source} ones by up to "
                    f"{anchor_residual_px(model, source):.2f} px per corner (the source rounds "
                    "anchor sizes to whole pixels)"
                )
            if "roi_heads" in parts:
                approximations.append(
                    "boxes: the source adds 1 to box widths in the ROI level assignment and NMS"
                    + (
                        " and ends ROIAlign boxes at x2 (not x2 + 1)"
                        if source == "maskrcnn_benchmark"
                        else ""
                    )
                )
    model_sd = model.state_dict()
    state = {k: model_sd[k].detach().clone() for k in report.loaded}
    info = {
        "source": source,
        "parts": ["backbone", *parts],
        "loaded": len(state),
        "not_converted": list(not_converted),
        "input": dict(INPUT_CONVENTIONS[source]),
        "settings": source_settings(parts),
        "approximations": approximations,
    }
    return state, info
