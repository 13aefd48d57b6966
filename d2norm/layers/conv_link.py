"""The link between a norm and the conv whose output it normalizes.

Some norms need something of the conv that feeds them: Weight Standardization ("GN+WS",
"BN+WS") and weight centralization ("MABN") transform that conv's weight, and "CBN" reads its
input and weight. Such a norm defines ``prepare_preceding_conv(conv)``; d2norm's preparation
pass (:func:`d2norm.prepare_model`) finds the conv and calls it.

A norm whose conv needs a weight transform, built by name through ``get_norm``, gets
:func:`require_prepared_conv`: its first training forward raises unless
``prepare_preceding_conv`` has run (it has not in a model built by detectron2's own
``build_model``), instead of silently training a different model. The check removes itself after
the first training forward that passes, so it costs nothing afterwards. (A layer constructed
directly is the caller's to pair with its conv; CBN checks its binding itself.)

:class:`ModuleRef` and :class:`TensorRef` are weak references that survive ``copy.deepcopy`` and
pickling, for links that must not own what they point at.
"""

import weakref

__all__ = [
    "ModuleRef",
    "TensorRef",
    "require_prepared_conv",
    "mark_conv_prepared",
    "is_conv_prepared",
    "remove_hook",
]

_PREPARED_KEY = "_d2norm_conv_prepared"  # norm.__dict__: set by mark_conv_prepared


class ModuleRef:
    """A weak reference to a module that deep-copies and pickles sensibly.

    ``copy.deepcopy`` of a model re-targets it to the copy of the referenced module when that
    module was copied first (a conv registered before its norm is), else to nothing; pickling
    stores the module itself."""

    __slots__ = ("_ref",)

    def __init__(self, module=None):
        self._ref = None if module is None else weakref.ref(module)

    def __call__(self):
        return None if self._ref is None else self._ref()

    def __deepcopy__(self, memo):
        target = self()
        return ModuleRef(None if target is None else memo.get(id(target)))

    def __reduce__(self):
        return (ModuleRef, (self(),))


class TensorRef:
    """A weak reference to a tensor; empty after ``copy.deepcopy`` or a pickle round trip."""

    __slots__ = ("_ref",)

    def __init__(self, tensor=None):
        self._ref = None if tensor is None else weakref.ref(tensor)

    def __call__(self):
        return None if self._ref is None else self._ref()

    def __deepcopy__(self, memo):
        return TensorRef()

    def __reduce__(self):
        return (TensorRef, ())


def remove_hook(hooks, fn):
    """Remove every entry of a module's hook dict (e.g. ``module._forward_pre_hooks``) that is
    ``fn``. Safe inside a running hook (torch iterates over a snapshot of the hooks)."""
    for key in [k for k, h in hooks.items() if h is fn]:
        del hooks[key]


def mark_conv_prepared(norm):
    """Record that ``norm.prepare_preceding_conv`` has set up the conv that feeds ``norm``."""
    norm.__dict__[_PREPARED_KEY] = True


def is_conv_prepared(norm):
    return bool(norm.__dict__.get(_PREPARED_KEY, False))


def _layer_name(norm):
    name = getattr(norm, "_d2norm_name", None)
    return f"{type(norm).__name__} '{name}'" if name else repr(norm)


def _check_prepared(norm, args):
    """Forward pre-hook: the first training forward of an unprepared norm raises."""
    if not norm.training:
        return None
    if not is_conv_prepared(norm):
        needs = getattr(type(norm), "conv_requirement", "its conv to be prepared")
        raise RuntimeError(
            f"{_layer_name(norm)} needs {needs}, but the conv before it was never prepared, so "
            "training would silently use another normalization. Fix: build the model with "
            "d2norm.build_model(cfg) (detectron2.modeling.build_model does not prepare it), or call "
            "d2norm.prepare_model(model) after building it; for a standalone layer, call "
            "norm.prepare_preceding_conv(conv) with the conv whose output it normalizes."
        )
    remove_hook(norm._forward_pre_hooks, _check_prepared)
    return None


def require_prepared_conv(norm):
    """Make the first training forward of ``norm`` raise unless its conv was prepared
    (:func:`mark_conv_prepared`, called by ``prepare_preceding_conv``)."""
    if not any(h is _check_prepared for h in norm._forward_pre_hooks.values()):
        norm.register_forward_pre_hook(_check_prepared)
    return norm
