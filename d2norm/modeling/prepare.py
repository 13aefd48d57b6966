"""Building a detectron2 model with d2norm's norms, and the one model-preparation pass.

:func:`prepare_model` (run by :func:`build_model`), in order:

1. refuses layers that cannot be used (a GN type probe that ended up in a model);
2. gives RetinaNet heads per-level copies of their norms with state (:mod:`.retinanet`);
3. freezes every norm with a frozen form whose parameters are all frozen (:mod:`.freeze`);
4. gives every :class:`~d2norm.layers.base.ConvFedNorm` ("GN+WS" / "BN+WS": Weight
   Standardization, "MABN": weight centralization, both ``torch.nn.utils.parametrize``
   parametrizations; "CBN" binds to it) the conv that feeds it (:mod:`.link`; a conv feeding a
   CBN or MABN loses its zero bias). Norms that need nothing of the conv (BN, GN, SyncBN, BN*)
   are left alone;
5. places the activation of FRN / EvoNorm-S0 per call site (:mod:`.sites`);
6. lifts the training check of layers built by name (:func:`d2norm.norms.end_pass_checks`): a
   model that skips this pass refuses its first training step where that would silently change
   the method (an unprepared conv, FRN / EvoNorm-S0 activations, a norm left in a frozen stage).

With ``cfg``, it also checks that every d2norm layer has ``cfg.D2NORM``'s options, so a model
built from a plain config by detectron2's own ``build_model`` (whose norms take the defaults)
is refused with the key to fix. Without ``cfg`` (e.g. a LazyConfig model built with
``norm=d2norm.norm(...)``), the options are those the layers carry. The pass is idempotent.
"""

import torch

from ..layers import ConvFedNorm, CycleNormList
from ..norms import bind_norms, config_options, end_pass_checks, layer_options, spec_of
from ..patches import patch_get_norm
from .freeze import freeze_norm, is_frozen_norm
from .link import find_feeding_conv, install_link_check, no_conv_error, remove_zero_bias, split
from .retinanet import per_level_norms_in_retinanet_heads
from .sites import prepare_norm_sites

__all__ = ["build_model", "prepare_model", "check_norm_options"]


def prepare_model(model, cfg=None):
    """Prepare ``model`` in place (see the module docstring) and return it. Raises
    ``ValueError`` naming the module path where that is impossible, and, with ``cfg``, where a
    layer's options differ from ``cfg.D2NORM``."""
    _refuse_unusable_layers(model)
    if cfg is not None:
        check_norm_options(model, cfg)
    per_level_norms_in_retinanet_heads(model)
    modules = dict(model.named_modules())
    for path, norm in list(modules.items()):
        if not path:
            continue
        if is_frozen_norm(norm):
            freeze_norm(model, modules, path, norm)
            continue
        if not isinstance(norm, ConvFedNorm):
            continue
        norm._d2norm_name = path
        found = find_feeding_conv(model, path, modules)
        if found is None:
            raise no_conv_error(path, norm)
        conv, conv_path, structural = found
        if norm.conv_without_bias:
            remove_zero_bias(conv, conv_path, path, norm)
        norm.prepare_preceding_conv(conv, shared=isinstance(modules[split(path)[0]], CycleNormList))
        if not structural:
            install_link_check(norm, path, conv, conv_path)
    prepare_norm_sites(model)
    end_pass_checks(model)  # layers built by name no longer refuse to train (d2norm.norms)
    return model


def _refuse_unusable_layers(model):
    for path, m in model.named_modules():
        reason = m.__dict__.get("unusable")
        if isinstance(reason, str):
            raise ValueError(f"The layer at '{path}' cannot be used: {reason}")


def check_norm_options(model, cfg):
    """Raise ``ValueError`` if a d2norm layer of ``model`` has options other than ``cfg.D2NORM``'s
    (a model built by name outside :func:`build_model`, e.g. by detectron2's ``build_model``)."""
    for path, m in model.named_modules():
        have = layer_options(m)
        if not have:
            continue
        spec = spec_of(m)
        want = config_options(cfg, spec.name)
        for kw, value in have.items():
            if value != want[kw]:
                key = "D2NORM." + spec.options[kw]
                raise ValueError(
                    f"The {spec.name} layer at '{path}' has {kw}={value!r}, but the config sets "
                    f"{key}={want[kw]!r}: the model was built without the config's norm options "
                    "(detectron2.modeling.build_model(cfg) passes only the name, so the norms take "
                    "their defaults). Fix: build it with d2norm.build_model(cfg), or with "
                    "detectron2.modeling.build_model(d2norm.bind_norms(cfg)), or pass "
                    f"norm=d2norm.norm({spec.name!r}, {kw}=...)."
                )


def build_model(cfg):
    """detectron2's ``build_model`` with d2norm's norm names bound to ``cfg.D2NORM``'s options
    (:func:`d2norm.bind_norms`), then :func:`prepare_model`."""
    from detectron2.modeling import build_model as d2_build_model

    patch_get_norm()
    model = d2_build_model(bind_norms(cfg))
    prepare_model(model)
    # parametrizations and CBN/MABN state are created on the model's device
    return model.to(torch.device(cfg.MODEL.DEVICE))
