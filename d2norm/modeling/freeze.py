"""Frozen norms: a norm with state becomes the ``FrozenBatchNorm2d`` of its eval map.

:func:`convert_frozen_norms` is d2norm's ``FrozenBatchNorm2d.convert_frozen_batchnorm`` for
every norm the table gives a frozen form (BN, SyncBN, BN+WS, FrozenStatsBN, CBN, MABN, BRN):
each becomes the ``FrozenBatchNorm2d`` of its eval map (``eval_statistics``: γ·(x −
running_mean)/√(running_var + ε) + β; MABN has no mean, BRN's σ includes ε), and the conv
before a BN+WS / MABN keeps its weight transform, part of the function its weights were trained
with. detectron2's ``freeze`` (``MODEL.BACKBONE.FREEZE_AT``) converts only ``BatchNorm2d``
layers and leaves the others with frozen parameters; the preparation pass freezes every d2norm
norm whose parameters are all frozen that way (:func:`is_frozen_norm`).
"""

from torch import nn

from ..layers import ConvFedNorm
from ..norms import frozen_batch_norm_of, spec_of
from .link import end_link_check, find_feeding_conv, split

__all__ = ["convert_frozen_norms", "freeze_norm", "frozen_form", "is_frozen_norm"]


def frozen_form(module):
    """``module -> frozen module`` for a norm that has a frozen form (the table's ``frozen``;
    torch's ``BatchNorm2d`` / ``SyncBatchNorm`` too), else None."""
    spec = spec_of(module)
    if spec is not None:
        return spec.frozen
    if isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        return frozen_batch_norm_of
    return None


def is_frozen_norm(module):
    """A d2norm norm with a frozen form whose parameters were all frozen (e.g. by detectron2's
    freeze)."""
    if spec_of(module) is None or frozen_form(module) is None:
        return False
    params = list(module.parameters(recurse=False))
    return bool(params) and not any(p.requires_grad for p in params)


def _lone_conv_error(norm, where):
    return ValueError(
        f"Cannot freeze {where}: the conv feeding it must keep {norm.conv_requirement}, and d2norm "
        "finds no such conv. Fix: freeze (convert_frozen_norms on) a module that contains the conv "
        "too, or prepare it first (d2norm.prepare_model, or norm.prepare_preceding_conv(conv))."
    )


def freeze_norm(model, modules, path, norm):
    """Replace the norm at ``path`` by its frozen form; its conv keeps its weight transform.
    ``modules``: ``dict(model.named_modules())``, updated."""
    needs_conv = isinstance(norm, ConvFedNorm)
    found = find_feeding_conv(model, path, modules) if needs_conv else None
    if needs_conv:
        if norm.conv_transform() is not None:
            if found is not None:
                norm.prepare_preceding_conv(found[0])
            elif not norm.conv_prepared:
                raise _lone_conv_error(norm, f"the {type(norm).__name__} at '{path}'")
        norm.release_conv()  # the eval map needs nothing else of the conv
    end_link_check(norm, found[0] if found is not None else None)
    frozen = frozen_form(norm)(norm)
    parent_path, name = split(path)
    setattr(modules[parent_path], name, frozen)
    modules[path] = frozen
    return frozen


def convert_frozen_norms(module):
    """d2norm's ``FrozenBatchNorm2d.convert_frozen_batchnorm``, for every norm (see the module
    docstring): each norm with a frozen form in ``module`` is replaced by it, so it no longer
    normalizes with batch statistics nor updates any state, and has no trainable parameter. The
    conv before a BN+WS / MABN keeps (or gets) its weight transform; CBN lets go of its conv.
    GN and GN+WS are left as they are (they have no batch statistics), as detectron2 does.

    Like detectron2's function: if ``module`` itself is such a norm, returns a new module;
    otherwise converts in place and returns ``module``.
    """
    form = frozen_form(module)
    if form is not None:
        if isinstance(module, ConvFedNorm):
            if module.conv_transform() is not None and not module.conv_prepared:
                raise _lone_conv_error(module, f"a lone {type(module).__name__}")
            module.release_conv()
        return form(module)
    modules = dict(module.named_modules())
    for path, m in list(modules.items()):
        if path and frozen_form(m) is not None:
            freeze_norm(module, modules, path, m)
    return module
