"""Weak links between modules (a norm and the conv whose output it normalizes).

:class:`ModuleRef` and :class:`TensorRef` are weak references that survive ``copy.deepcopy`` and
pickling, for links that must not own what they point at.
"""

import weakref

__all__ = ["ModuleRef", "TensorRef", "remove_hook"]


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
