"""Where Cross-Iteration BN (CBN) is known to stall training: one warning from the config.

Measured on the synthetic Mask R-CNN R-18-FPN trained from scratch (docs/cbn_diagnosis.md): with
the paper's gradient (``D2NORM.CBN.GRAD_THROUGH_COMPENSATION False``: the compensated statistics
of past iterations are constants in backprop), CBN with a window of more than one iteration in
the RoI heads (4conv1fc box head, mask head) stops the mask loss from falling once burn-in
ends, and the official layer does the same in the same model. That gradient is not the
gradient of the forward pass (the window statistics follow the current weight through the
compensation, the backward treats them as fixed), and the heads, whose inputs are
post-ReLU RoI features with large means, are where the difference is largest.

:func:`cbn_regime_warning` is a pure function of the config; :func:`warn_cbn_regime` logs its
message once (called by the trainer).
"""

import logging

__all__ = ["cbn_regime_warning", "model_cbn_regime_warning", "warn_cbn_regime"]

logger = logging.getLogger("d2norm")


def _head_norm_sites(cfg):
    """Config keys of the RoI-head norms that are built with a conv (norm applied), in order."""
    model = cfg.MODEL
    sites = []
    if model.ROI_BOX_HEAD.get("NUM_CONV", 0) > 0:
        sites.append("MODEL.ROI_BOX_HEAD.NORM")
    if model.get("MASK_ON", False) and model.ROI_MASK_HEAD.get("NUM_CONV", 0) > 0:
        sites.append("MODEL.ROI_MASK_HEAD.NORM")
    if model.get("KEYPOINT_ON", False):
        pass  # detectron2's keypoint head has no norm option
    return sites


def _get(cfg, dotted):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def cbn_regime_warning(cfg):
    """The warning for a config that puts CBN where it is known to stall training, else None.

    The failing regime (measured): a model trained from scratch (``MODEL.WEIGHTS`` empty) with
    ``"CBN"`` as the norm of a RoI head with convs (box head with ``NUM_CONV > 0``, mask head when
    ``MASK_ON``), a window of more than one iteration (``D2NORM.CBN.BUFFER_SIZE > 1``) and the
    paper's gradient (``D2NORM.CBN.GRAD_THROUGH_COMPENSATION False``). Not warned about: CBN in the
    backbone and FPN, ``BUFFER_SIZE 1`` (plain BN), the exact gradient
    (``GRAD_THROUGH_COMPENSATION True``), and models that start from pretrained weights (the
    published CBN detection results use CBN in FPN and heads on a pretrained backbone).
    """
    d2norm_cfg = cfg.get("D2NORM", None)
    if d2norm_cfg is None or "CBN" not in d2norm_cfg:
        return None
    cbn = d2norm_cfg.CBN
    if int(cbn.BUFFER_SIZE) <= 1 or bool(cbn.get("GRAD_THROUGH_COMPENSATION", False)):
        return None
    if str(cfg.MODEL.get("WEIGHTS", "") or "").strip():
        return None
    keys = [key for key in _head_norm_sites(cfg) if _get(cfg, key) == "CBN"]
    if not keys:
        return None
    return _message(
        f"{int(cbn.BUFFER_SIZE)}-iteration window",
        keys,
        grad="D2NORM.CBN.GRAD_THROUGH_COMPENSATION",
        weights="MODEL.WEIGHTS",
        fix_grad="set D2NORM.CBN.GRAD_THROUGH_COMPENSATION True",
    )


def _message(window, keys, grad, weights, fix_grad):
    return (
        f"CBN with a {window} and the paper's gradient ({grad} False) is used in the RoI heads "
        f"({', '.join(keys)}) of a model trained from scratch ({weights} empty). In this setting "
        "training stalls once burn-in ends (the mask loss stops falling; measured with d2norm's and "
        "the official CBN layer alike, docs/cbn_diagnosis.md). Fix: "
        f"{fix_grad} (the exact gradient of the window statistics), or use another norm for "
        f'{", ".join(keys)} (e.g. "GN" or "BN") and keep CBN in the backbone / FPN.'
    )


#: RoI-head modules of a built model and the LazyConfig key of their norm
#: (configs/lazy/common/mask_rcnn_fpn.py).
_LAZY_HEAD_SITES = {
    "roi_heads.box_head.": "model.model.roi_heads.box_head.conv_norm",
    "roi_heads.mask_head.": "model.model.roi_heads.mask_head.conv_norm",
}


def model_cbn_regime_warning(model, weights=""):
    """:func:`cbn_regime_warning` for a built model (a LazyConfig's, whose options are its
    layers'): CBN layers in its RoI heads with a window of more than one iteration and the
    paper's gradient, and no initial weights (``weights``: ``train.init_checkpoint``)."""
    from ..layers import CrossIterationBatchNorm2d

    if str(weights or "").strip():
        return None
    keys, windows = [], set()
    for path, m in getattr(model, "module", model).named_modules():
        if not isinstance(m, CrossIterationBatchNorm2d) or m.buffer_size <= 1 or m.grad_through_compensation:
            continue
        for prefix, key in _LAZY_HEAD_SITES.items():
            if path.startswith(prefix) and key not in keys:
                keys.append(key)
                windows.add(m.buffer_size)
    if not keys:
        return None
    return _message(
        f"{'/'.join(map(str, sorted(windows)))}-iteration window",
        keys,
        grad="grad_through_compensation",
        weights="train.init_checkpoint",
        fix_grad='use d2norm.norm("CBN", ..., grad_through_compensation=True)',
    )


def warn_cbn_regime(cfg, log=None):
    """Log :func:`cbn_regime_warning`'s message (once per call) and return it (or None)."""
    message = cbn_regime_warning(cfg)
    if message:
        (log or logger).warning(message)
    return message
