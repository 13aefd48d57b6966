"""Building a detectron2 model with d2norm's norms, and the one model-preparation pass.

:func:`prepare_model` (run by :func:`build_model`) gives every norm that needs something of the
conv feeding it (it defines ``prepare_preceding_conv``: "GN+WS" / "BN+WS" put Weight
Standardization on that conv, "MABN" weight centralization, both ``torch.nn.utils.parametrize``
parametrizations; "CBN" binds to it) that conv. Norms that need nothing of the conv (BN, GN,
SyncBN, BN*) are left alone. The pass is idempotent.

Which conv feeds a norm (:func:`find_feeding_conv`), in this order:

1. the norm is the ``norm`` of a detectron2 ``Conv2d(..., norm=...)``: that conv (its forward
   applies the norm to its output);
2. else the module registered right before the norm in the same parent is an ``nn.Conv2d`` with
   as many output channels as the norm has, and no norm or activation of its own: that conv
   (``nn.Sequential(conv, norm, relu, ...)`` in RetinaNet's head; ``self.conv`` then ``self.bn``
   in RegNet; a user module that calls ``get_norm`` after building its conv). Registration order
   is not call order, so the first training forward checks that the norm's input is that
   conv's output, and raises otherwise; the check then removes itself;
3. else the pass refuses, with the norm's module path and the fix.

A conv feeding a CBN or MABN has no bias (CBN's statistics are linear in the conv weight; MABN
normalizes without subtracting a mean, relying on zero-mean conv outputs): a zero bias (e.g.
RetinaNet's freshly initialized head) is removed, a non-zero one is refused.

RetinaNet's head applies each norm once per FPN level. In a ``RetinaNetHead`` every d2norm norm
with state (CBN, MABN, BN+WS, SyncBN) becomes a :class:`~d2norm.layers.CycleNormList` of one
copy per level (shared γ, β; CBN copies bound to the shared conv), and the ``nn.SyncBatchNorm``
layers detectron2 builds there for "SyncBN" become d2norm's ``SyncBatchNorm2d``.

Frozen norms: :func:`convert_frozen_norms` is d2norm's ``FrozenBatchNorm2d.convert_frozen_batchnorm``
for every norm (BN, SyncBN, BN+WS, CBN, MABN): each becomes the ``FrozenBatchNorm2d`` of its eval
map (γ·(x − running_mean)/√(running_var + ε) + β; MABN has no mean), and the conv before a
BN+WS / MABN keeps its weight transform, part of the function its weights were trained with.
detectron2's ``freeze`` (``MODEL.BACKBONE.FREEZE_AT``) converts only ``BatchNorm2d`` layers and
leaves the others with frozen parameters; the pass freezes every d2norm norm whose parameters are
all frozen that way.
"""

import logging

import torch
from torch import nn
from torch.nn.utils import parametrize

from .layers.conv_link import ModuleRef, TensorRef, is_conv_prepared, remove_hook
from .layers.norm_sites import prepare_norm_sites
from .norms import norm_options_from_config
from .patches import patch_get_norm

__all__ = [
    "build_model",
    "prepare_model",
    "convert_frozen_norms",
    "find_feeding_conv",
    "frozen_batch_norm_of",
    "remap_parametrized_keys",
]

logger = logging.getLogger(__name__)

_PARAM_SUFFIX = "parametrizations.weight.original"
_FEED_KEY = "_d2norm_feeding_conv"  # norm.__dict__: (ModuleRef(conv), norm path, conv path)
_OUTPUT_KEY = "_d2norm_conv_output"  # conv.__dict__: TensorRef to its last training output
_PENDING_KEY = "_d2norm_link_checks"  # conv.__dict__: norms still to check their input


def _needs_conv(module):
    return callable(getattr(module, "prepare_preceding_conv", None))


def _channels(norm):
    return getattr(norm, "num_features", getattr(norm, "num_channels", None))


def _join(parent_path, name):
    return f"{parent_path}.{name}" if parent_path else name


def _split(path):
    parent_path, _, name = path.rpartition(".")
    return parent_path, name


def _requirement(norm):
    return getattr(type(norm), "conv_requirement", "the conv whose output it normalizes")


def find_feeding_conv(model, path, modules=None):
    """The conv that feeds the norm at ``path`` in ``model`` (see the module docstring):
    ``(conv, conv_path, structural)``, ``structural`` True for a detectron2 ``Conv2d(norm=...)``
    (no runtime check needed); None if there is none. ``modules``: ``dict(model.named_modules())``."""
    from .layers import CycleNormList

    modules = dict(model.named_modules()) if modules is None else modules
    norm = modules[path]
    channels = _channels(norm)
    parent_path, name = _split(path)
    parent = modules[parent_path]
    if isinstance(parent, nn.Conv2d) and name == "norm" and getattr(parent, "norm", None) is norm:
        return parent, parent_path, True
    if isinstance(parent, CycleNormList):  # a per-call copy: the list stands where the norm stood
        path = parent_path
        parent_path, name = _split(path)
        parent = modules[parent_path]
    names = [k for k, m in parent._modules.items() if m is not None]
    i = names.index(name)
    if i == 0:
        return None
    prev = parent._modules[names[i - 1]]
    if (
        isinstance(prev, nn.Conv2d)
        and prev.out_channels == channels
        and getattr(prev, "norm", None) is None
        and getattr(prev, "activation", None) is None
    ):
        return prev, _join(parent_path, names[i - 1]), False
    return None


def _no_conv_error(path, norm):
    return ValueError(
        f"{type(norm).__name__} at '{path}' needs {_requirement(norm)}, but d2norm finds no conv "
        f"feeding it: it is neither the norm of a detectron2 Conv2d(..., norm=...) nor registered "
        f"right after an nn.Conv2d with {_channels(norm)} output channels (and no norm or "
        "activation of its own) in the same parent module. Without that conv it would silently be "
        "another normalization. Fix: build the pair as detectron2.layers.Conv2d(..., "
        "norm=get_norm(NORM, C)), or register the norm right after its conv in the same module "
        "(self.conv = ...; self.norm = get_norm(...)) and apply it to that conv's output; or use "
        'a norm that needs no conv ("GN", "BN", "SyncBN").'
    )


# ------------------------------------------------------------------ first-forward link check
def _record_conv_output(conv, args, output):
    if conv.training:
        conv.__dict__[_OUTPUT_KEY] = TensorRef(output)


def _check_norm_input(norm, args):
    """Forward pre-hook: in the first training forward, the input must be the linked conv's output."""
    if not norm.training:
        return None
    ref, norm_path, conv_path = norm.__dict__[_FEED_KEY]
    conv = ref()
    seen = conv.__dict__.pop(_OUTPUT_KEY, None) if conv is not None else None
    if seen is None or seen() is not args[0]:
        raise RuntimeError(
            f"{type(norm).__name__} at '{norm_path}' was linked to the conv at '{conv_path}' (the "
            "module registered right before it), but in training its input is not that conv's "
            f"output, so {_requirement(norm)} would be applied to the wrong conv. Fix: apply the "
            "norm directly to the output of the conv registered before it, or build the pair as "
            "detectron2.layers.Conv2d(..., norm=get_norm(NORM, C))."
        )
    _end_link_check(norm, conv)
    return None


def _install_link_check(norm, norm_path, conv, conv_path):
    if _FEED_KEY in norm.__dict__:
        return
    norm.__dict__[_FEED_KEY] = (ModuleRef(conv), norm_path, conv_path)
    norm.register_forward_pre_hook(_check_norm_input)
    conv.__dict__[_PENDING_KEY] = conv.__dict__.get(_PENDING_KEY, 0) + 1
    if not any(h is _record_conv_output for h in conv._forward_hooks.values()):
        conv.register_forward_hook(_record_conv_output)


def _end_link_check(norm, conv):
    if norm.__dict__.pop(_FEED_KEY, None) is None:
        return
    remove_hook(norm._forward_pre_hooks, _check_norm_input)
    if conv is None:
        return
    left = conv.__dict__.get(_PENDING_KEY, 1) - 1
    if left > 0:
        conv.__dict__[_PENDING_KEY] = left
        return
    conv.__dict__.pop(_PENDING_KEY, None)
    conv.__dict__.pop(_OUTPUT_KEY, None)
    remove_hook(conv._forward_hooks, _record_conv_output)


# ------------------------------------------------------------------ the pass
def prepare_model(model):
    """Give every norm that needs it the conv that feeds it (see the module docstring).
    Returns ``model``; raises ``ValueError`` naming the module path where that is impossible."""
    from .layers import CrossIterationBatchNorm2d, CycleNormList, MovingAverageBatchNorm2d

    _refuse_unusable_layers(model)
    _per_level_norms_in_retinanet_heads(model)
    modules = dict(model.named_modules())
    for path, norm in list(modules.items()):
        if not path:
            continue
        if _is_frozen_d2norm_norm(norm):
            _freeze_norm(model, modules, path, norm)
            continue
        if not _needs_conv(norm):
            continue
        norm._d2norm_name = path
        found = find_feeding_conv(model, path, modules)
        if found is None:
            raise _no_conv_error(path, norm)
        conv, conv_path, structural = found
        if isinstance(norm, CrossIterationBatchNorm2d):
            _remove_zero_bias(conv, conv_path, path, norm)
            norm.bind(conv, shared=isinstance(modules[_split(path)[0]], CycleNormList))
        else:
            if isinstance(norm, MovingAverageBatchNorm2d):
                _remove_zero_bias(conv, conv_path, path, norm)
            norm.prepare_preceding_conv(conv)
        _register_plain_weight_hook(conv)
        if not structural:
            _install_link_check(norm, path, conv, conv_path)
    prepare_norm_sites(model)  # BRN / FRN / EvoNorm-S0: activations per call site, frozen BRN
    return model


def _register_plain_weight_hook(conv):
    if parametrize.is_parametrized(conv, "weight") and not getattr(conv, "_d2norm_key_hook", False):
        conv._register_load_state_dict_pre_hook(_load_plain_weight_into_parametrized)
        conv._d2norm_key_hook = True


def _remove_zero_bias(conv, conv_path, norm_path, norm):
    if conv.bias is None:
        return
    if bool(torch.count_nonzero(conv.bias.detach())):
        raise ValueError(
            f"The conv at '{conv_path}' feeding the {type(norm).__name__} at '{norm_path}' has a "
            "non-zero bias. CBN's statistics are linear in the conv weight and MABN normalizes "
            "without subtracting a mean, so the conv before them has no bias. Fix: build that conv "
            "with bias=False (or prepare the model before loading weights with a bias)."
        )
    conv.bias = None
    logger.info(
        "Removed the (zero) bias of the conv at '%s': it feeds the %s at '%s'.",
        conv_path,
        type(norm).__name__,
        norm_path,
    )


def _refuse_unusable_layers(model):
    for path, m in model.named_modules():
        reason = m.__dict__.get("unusable")
        if isinstance(reason, str):
            raise ValueError(f"The layer at '{path}' cannot be used: {reason}")


def _has_per_call_state(module):
    """A d2norm norm whose buffers advance in training (not a stateless GN)."""
    from .layers import NORM_TYPES

    return isinstance(module, NORM_TYPES) and next(module.buffers(recurse=False), None) is not None


def _per_level_norms_in_retinanet_heads(model):
    try:
        from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
    except ImportError:  # pragma: no cover - detectron2 without RetinaNet
        return
    from detectron2.layers.batch_norm import CycleBatchNormList

    from .layers import CycleNormList, SyncBatchNorm2d

    for head_path, head in list(model.named_modules()):
        if not isinstance(head, RetinaNetHead):
            continue
        levels = getattr(head, "_num_features", None)
        for path, m in list(head.named_modules()):
            if not path:
                continue
            parent_path, name = _split(path)
            parent = head.get_submodule(parent_path) if parent_path else head
            if isinstance(m, CycleBatchNormList):  # detectron2's "SyncBN" here is torch's layer
                for i, bn in enumerate(m):
                    if type(bn) is nn.SyncBatchNorm:
                        m[i] = _as_d2norm_sync_bn(bn, SyncBatchNorm2d)
            elif _has_per_call_state(m) and not isinstance(parent, (CycleNormList, CycleBatchNormList)):
                if not isinstance(levels, int):
                    raise ValueError(
                        f"{type(m).__name__} at '{_join(head_path, path)}' is applied once per "
                        "feature level by the RetinaNet head, but the head does not say how many "
                        'levels it has (_num_features). Fix: use a norm without state ("GN", '
                        '"GN+WS") in the head.'
                    )
                setattr(parent, name, CycleNormList.of(m, levels))


def _as_d2norm_sync_bn(bn, cls):
    new = cls(
        bn.num_features,
        eps=bn.eps,
        momentum=bn.momentum,
        affine=bn.affine,
        track_running_stats=bn.track_running_stats,
    )
    new.load_state_dict(bn.state_dict())
    return new.to(bn.running_mean.device if bn.running_mean is not None else None)


# ------------------------------------------------------------------ freezing
def _freezable_types():
    from .layers import (
        BatchNormWS,
        BatchRenorm2d,
        BCNBatchNorm2d,
        CrossIterationBatchNorm2d,
        MovingAverageBatchNorm2d,
    )

    return (
        BCNBatchNorm2d,  # BCN's batch part; BCN's channel part stays, as GN
        nn.BatchNorm2d,
        nn.SyncBatchNorm,
        BatchNormWS,
        CrossIterationBatchNorm2d,
        MovingAverageBatchNorm2d,
        BatchRenorm2d,
    )


def _is_frozen_d2norm_norm(module):
    """A d2norm norm with state whose parameters were all frozen (e.g. by detectron2's freeze)."""
    from .layers import NORM_TYPES

    if not isinstance(module, NORM_TYPES) or not isinstance(module, _freezable_types()):
        return False
    params = list(module.parameters(recurse=False))
    return bool(params) and not any(p.requires_grad for p in params)


def frozen_batch_norm_of(norm):
    """detectron2 ``FrozenBatchNorm2d`` computing the eval map of a BN-type, CBN, MABN or BRN layer."""
    from detectron2.layers import FrozenBatchNorm2d

    from .layers import BatchRenorm2d

    if isinstance(norm, BatchRenorm2d):
        # BRN keeps the running sigma (eps included): FrozenBN's sqrt(var + eps) must equal it
        frozen = FrozenBatchNorm2d(norm.num_features, eps=norm.eps)
        with torch.no_grad():
            frozen.weight.copy_(norm.weight)
            frozen.bias.copy_(norm.bias)
            frozen.running_mean.copy_(norm.running_mean)
            frozen.running_var.copy_((norm.running_std.double().square() - norm.eps).clamp_min(0.0))
        return frozen.to(norm.running_std.device)
    if getattr(norm, "running_var", None) is None:
        raise ValueError(
            f"{type(norm).__name__} has no running statistics (track_running_stats="
            "False), so it has no eval map to freeze. Fix: keep it trainable."
        )
    frozen = FrozenBatchNorm2d(norm.num_features, eps=norm.eps)
    with torch.no_grad():
        if getattr(norm, "weight", None) is not None:
            frozen.weight.copy_(norm.weight)
        if getattr(norm, "bias", None) is not None:
            frozen.bias.copy_(norm.bias)
        frozen.running_var.copy_(norm.running_var.reshape(-1))
        mean = getattr(norm, "running_mean", None)
        frozen.running_mean.copy_(mean if mean is not None else torch.zeros_like(frozen.running_mean))
    return frozen.to(norm.running_var.device)


def _freeze_norm(model, modules, path, norm):
    """Replace the norm at ``path`` by its frozen eval map; its conv keeps its weight transform."""
    from .layers import CrossIterationBatchNorm2d

    found = find_feeding_conv(model, path, modules) if _needs_conv(norm) else None
    if isinstance(norm, CrossIterationBatchNorm2d):
        norm.unbind()  # the eval map needs nothing of the conv
    elif _needs_conv(norm):
        if found is not None:
            norm.prepare_preceding_conv(found[0])
            _register_plain_weight_hook(found[0])
        elif not is_conv_prepared(norm):
            raise ValueError(
                f"Cannot freeze the {type(norm).__name__} at '{path}': the conv feeding it must keep "
                f"{_requirement(norm)}, and d2norm finds no such conv. Fix: freeze the module that "
                "contains the conv too, or prepare the model first (d2norm.prepare_model)."
            )
    _end_link_check(norm, found[0] if found is not None else None)
    frozen = frozen_batch_norm_of(norm)
    parent_path, name = _split(path)
    setattr(modules[parent_path], name, frozen)
    modules[path] = frozen
    return frozen


def convert_frozen_norms(module):
    """d2norm's ``FrozenBatchNorm2d.convert_frozen_batchnorm``, for every norm.

    Each BN, SyncBN (torch's and d2norm's), BN+WS, CBN, MABN and BRN layer in ``module`` becomes the
    ``FrozenBatchNorm2d`` of its eval map (:func:`frozen_batch_norm_of`), so it no longer
    normalizes with batch statistics nor updates any state, and has no trainable parameter. The
    conv before a BN+WS / MABN keeps (or gets) its weight transform; CBN lets go of its conv.
    GN and GN+WS are left as they are (they have no batch statistics), as detectron2 does.

    Like detectron2's function: if ``module`` itself is such a norm, returns a new module;
    otherwise converts in place and returns ``module``.
    """
    from .layers import CrossIterationBatchNorm2d

    types = _freezable_types()
    if isinstance(module, types):
        if isinstance(module, CrossIterationBatchNorm2d):
            module.unbind()
        elif _needs_conv(module) and not is_conv_prepared(module):
            raise ValueError(
                f"Cannot freeze a lone {type(module).__name__}: the conv feeding it must keep "
                f"{_requirement(module)}. Fix: call convert_frozen_norms on a module that contains "
                "the conv too, or norm.prepare_preceding_conv(conv) first."
            )
        return frozen_batch_norm_of(module)
    modules = dict(module.named_modules())
    for path, m in list(modules.items()):
        if path and isinstance(m, types):
            _freeze_norm(module, modules, path, m)
    return module


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
