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

__all__ = ["cbn_regime_warning", "warn_cbn_regime"]

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
    return (
        f"CBN with a {int(cbn.BUFFER_SIZE)}-iteration window and the paper's gradient "
        f"(D2NORM.CBN.GRAD_THROUGH_COMPENSATION False) is used in the RoI heads ({', '.join(keys)}) "
        "of a model trained from scratch (MODEL.WEIGHTS empty). In this setting training stalls "
        "once burn-in ends (the mask loss stops falling; measured with d2norm's and the official "
        "CBN layer alike, docs/cbn_diagnosis.md). Fix: set "
        "D2NORM.CBN.GRAD_THROUGH_COMPENSATION True (the exact gradient of the window statistics), "
        f'or use another norm for {", ".join(keys)} (e.g. "GN" or "BN") and keep CBN in the '
        "backbone / FPN."
    )


def warn_cbn_regime(cfg, log=None):
    """Log :func:`cbn_regime_warning`'s message (once per call) and return it (or None)."""
    message = cbn_regime_warning(cfg)
    if message:
        (log or logger).warning(message)
    return message
