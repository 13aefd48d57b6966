"""Which conv feeds a norm, and the first-forward check that it really does.

:func:`find_feeding_conv`, in this order:

1. the norm is the ``norm`` of a detectron2 ``Conv2d(..., norm=...)``: that conv (its forward
   applies the norm to its output);
2. else the module registered right before the norm in the same parent is an ``nn.Conv2d`` with
   as many output channels as the norm has, and no norm or activation of its own: that conv
   (``nn.Sequential(conv, norm, relu, ...)`` in RetinaNet's head; ``self.conv`` then ``self.bn``
   in RegNet; a user module that calls ``get_norm`` after building its conv). Registration order
   is not call order, so the first training forward checks that the norm's input is that
   conv's output, and raises otherwise (:func:`install_link_check`); the check then removes
   itself;
3. else None (the preparation pass refuses, with the norm's module path and the fix).
"""

import logging

import torch
from torch import nn

from ..layers import CycleNormList
from ..layers.conv_link import ModuleRef, TensorRef, remove_hook

__all__ = ["find_feeding_conv", "no_conv_error", "install_link_check", "end_link_check", "remove_zero_bias"]

logger = logging.getLogger(__name__)

_FEED_KEY = "_d2norm_feeding_conv"  # norm.__dict__: (ModuleRef(conv), norm path, conv path)
_OUTPUT_KEY = "_d2norm_conv_output"  # conv.__dict__: TensorRef to its last training output
_PENDING_KEY = "_d2norm_link_checks"  # conv.__dict__: norms still to check their input


def channels(norm):
    return getattr(norm, "num_features", getattr(norm, "num_channels", None))


def join(parent_path, name):
    return f"{parent_path}.{name}" if parent_path else name


def split(path):
    parent_path, _, name = path.rpartition(".")
    return parent_path, name


def find_feeding_conv(model, path, modules=None):
    """The conv that feeds the norm at ``path`` in ``model`` (see the module docstring):
    ``(conv, conv_path, structural)``, ``structural`` True for a detectron2 ``Conv2d(norm=...)``
    (no runtime check needed); None if there is none. ``modules``: ``dict(model.named_modules())``."""
    modules = dict(model.named_modules()) if modules is None else modules
    norm = modules[path]
    parent_path, name = split(path)
    parent = modules[parent_path]
    if isinstance(parent, nn.Conv2d) and name == "norm" and getattr(parent, "norm", None) is norm:
        return parent, parent_path, True
    if isinstance(parent, CycleNormList):  # a per-call copy: the list stands where the norm stood
        path = parent_path
        parent_path, name = split(path)
        parent = modules[parent_path]
    names = [k for k, m in parent._modules.items() if m is not None]
    i = names.index(name)
    if i == 0:
        return None
    prev = parent._modules[names[i - 1]]
    if (
        isinstance(prev, nn.Conv2d)
        and prev.out_channels == channels(norm)
        and getattr(prev, "norm", None) is None
        and getattr(prev, "activation", None) is None
    ):
        return prev, join(parent_path, names[i - 1]), False
    return None


def no_conv_error(path, norm):
    return ValueError(
        f"{type(norm).__name__} at '{path}' needs {norm.conv_requirement}, but d2norm finds no conv "
        f"feeding it: it is neither the norm of a detectron2 Conv2d(..., norm=...) nor registered "
        f"right after an nn.Conv2d with {channels(norm)} output channels (and no norm or "
        "activation of its own) in the same parent module. Without that conv it would silently be "
        "another normalization. Fix: build the pair as detectron2.layers.Conv2d(..., "
        "norm=get_norm(NORM, C)), or register the norm right after its conv in the same module "
        "(self.conv = ...; self.norm = get_norm(...)) and apply it to that conv's output; or use "
        'a norm that needs no conv ("GN", "BN", "SyncBN").'
    )


def remove_zero_bias(conv, conv_path, norm_path, norm):
    """A conv feeding a norm with ``conv_without_bias`` (CBN, MABN) has no bias: a zero bias
    (e.g. RetinaNet's freshly initialized head) is removed, a non-zero one is refused."""
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
            f"output, so {norm.conv_requirement} would be applied to the wrong conv. Fix: apply the "
            "norm directly to the output of the conv registered before it, or build the pair as "
            "detectron2.layers.Conv2d(..., norm=get_norm(NORM, C))."
        )
    end_link_check(norm, conv)
    return None


def install_link_check(norm, norm_path, conv, conv_path):
    """Make the first training forward of ``norm`` check that its input is ``conv``'s output."""
    if _FEED_KEY in norm.__dict__:
        return
    norm.__dict__[_FEED_KEY] = (ModuleRef(conv), norm_path, conv_path)
    norm.register_forward_pre_hook(_check_norm_input)
    conv.__dict__[_PENDING_KEY] = conv.__dict__.get(_PENDING_KEY, 0) + 1
    if not any(h is _record_conv_output for h in conv._forward_hooks.values()):
        conv.register_forward_hook(_record_conv_output)


def end_link_check(norm, conv):
    """Remove the check of :func:`install_link_check` (done, or the norm is replaced)."""
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
