"""Building a detectron2 model with d2norm's norms, and the one model-preparation pass.

After ``build_model``, :func:`prepare_model` visits every conv that carries a norm
(detectron2's ``Conv2d(..., norm=...)``; ``conv.norm``) and, where the norm defines
``prepare_preceding_conv(conv)``, lets it set up that conv: Weight Standardization for "GN+WS" /
"BN+WS", weight centralization for "MABN" (both ``torch.nn.utils.parametrize``
parametrizations), the conv link of "CBN". The pass is idempotent.

Frozen stages: detectron2's ``freeze`` (``MODEL.BACKBONE.FREEZE_AT``) turns only BatchNorm layers
into ``FrozenBatchNorm2d``. A CBN or MABN layer whose parameters it froze would still normalize
with batch statistics, so the pass replaces it by the ``FrozenBatchNorm2d`` of its own eval map
(γ·(x − running_mean)/√(running_var + ε) + β; MABN has no mean). A frozen MABN's conv keeps its
weight centralization, which is part of the function its pretrained weights were trained with.
"""
import torch
from torch import nn
from torch.nn.utils import parametrize

from .norms import norm_options_from_config
from .patches import patch_get_norm

__all__ = ["build_model", "prepare_model", "remap_parametrized_keys"]

_PARAM_SUFFIX = "parametrizations.weight.original"


def prepare_model(model):
    """Apply every norm's conv-side transform to the conv it follows. Returns ``model``."""
    from .layers import CrossIterationBatchNorm2d, MovingAverageBatchNorm2d

    for name, module in model.named_modules():
        norm = getattr(module, "norm", None)
        if isinstance(module, nn.Conv2d) and isinstance(norm, nn.Module):
            norm._d2norm_name = f"{name}.norm" if name else "norm"
            frozen = isinstance(norm, (CrossIterationBatchNorm2d, MovingAverageBatchNorm2d)) and not any(
                p.requires_grad for p in norm.parameters()
            )
            if frozen:
                if isinstance(norm, MovingAverageBatchNorm2d):
                    norm.prepare_preceding_conv(module)
                module.norm = frozen_batch_norm_of(norm)
                continue
            prepare = getattr(norm, "prepare_preceding_conv", None)
            if prepare is not None:
                prepare(module)
            if parametrize.is_parametrized(module, "weight") and not getattr(
                module, "_d2norm_key_hook", False
            ):
                module._register_load_state_dict_pre_hook(_load_plain_weight_into_parametrized)
                module._d2norm_key_hook = True
    return model


def frozen_batch_norm_of(norm):
    """detectron2 ``FrozenBatchNorm2d`` computing the eval map of a CBN / MABN layer."""
    from detectron2.layers import FrozenBatchNorm2d

    frozen = FrozenBatchNorm2d(norm.num_features, eps=norm.eps)
    with torch.no_grad():
        frozen.weight.copy_(norm.weight)
        frozen.bias.copy_(norm.bias)
        frozen.running_var.copy_(norm.running_var.reshape(-1))
        mean = getattr(norm, "running_mean", None)
        frozen.running_mean.copy_(mean if mean is not None else torch.zeros_like(frozen.running_mean))
    return frozen.to(norm.weight.device)


def _load_plain_weight_into_parametrized(state_dict, prefix, *args, **kwargs):
    """Let ``load_state_dict`` accept ``<conv>.weight`` for a parametrized conv weight."""
    plain, original = prefix + "weight", prefix + _PARAM_SUFFIX
    if plain in state_dict and original not in state_dict:
        state_dict[original] = state_dict.pop(plain)


def remap_parametrized_keys(checkpoint_state_dict, model_state_dict_keys):
    """Rename checkpoint keys ``X.weight`` to ``X.parametrizations.weight.original`` where the
    model holds the latter (and not the former), and the reverse (a checkpoint saved from a
    prepared model loaded into a baked / plain one). Pure: returns a new dict."""
    keys = set(model_state_dict_keys)
    out = {}
    for k, v in checkpoint_state_dict.items():
        if k.endswith(".weight") and k not in keys:
            candidate = k[: -len("weight")] + _PARAM_SUFFIX
            if candidate in keys:
                k = candidate
        elif k.endswith(_PARAM_SUFFIX) and k not in keys:
            candidate = k[: -len(_PARAM_SUFFIX)] + "weight"
            if candidate in keys:
                k = candidate
        out[k] = v
    return out


def build_model(cfg):
    """detectron2's ``build_model`` with d2norm's norm names and options, then :func:`prepare_model`."""
    from detectron2.modeling import build_model as d2_build_model

    patch_get_norm()
    with norm_options_from_config(cfg):
        model = d2_build_model(cfg)
    prepare_model(model)
    # parametrizations and CBN/MABN state are created on the model's device
    return model.to(torch.device(cfg.MODEL.DEVICE))
