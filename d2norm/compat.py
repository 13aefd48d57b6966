"""A stand-in for ``detectron2._C`` when detectron2 was installed without its C++/CUDA extension.

``detectron2.layers`` imports ``detectron2._C`` at module level (for deformable convolution,
rotated boxes, the fast COCO evaluator, ...). Mask R-CNN / Faster R-CNN training and COCO
evaluation with pycocotools need none of these ops, so a detectron2 built without its extension
(e.g. the ``pb1-detectron2`` sdist) is usable once that import succeeds.

:func:`make_compiled_ops_standin` makes a module to stand in for ``detectron2._C``;
:func:`d2norm.patches.install_compiled_ops_standin` registers it **only when detectron2 cannot
be imported without it** (detectron2 v0.6 without its extension; later detectron2 versions
import without ``_C`` and fall back to pure-Python code themselves). Informational functions
(``get_compiler_version``, ``get_cuda_version``, ``has_cuda``) answer that nothing is compiled;
any other attribute is a function that raises :class:`CompiledOpUnavailableError`, naming the
op and the fix, when it is called. With a real ``detectron2._C`` nothing is touched.
"""

import importlib.machinery
import types

__all__ = [
    "CompiledOpUnavailableError",
    "make_compiled_ops_standin",
    "compiled_ops_available",
    "STANDIN_MARKER",
]

STANDIN_MARKER = "__d2norm_standin__"


class CompiledOpUnavailableError(RuntimeError):
    pass


def _unavailable(op_name):
    def op(*args, **kwargs):
        raise CompiledOpUnavailableError(
            f"detectron2 compiled op '{op_name}' is not available: this detectron2 was installed "
            "without its C++/CUDA extension, and d2norm registered a stand-in 'detectron2._C' so "
            "that the pure-Python parts (Mask/Faster R-CNN with upright boxes, pycocotools "
            "evaluation) work. Fix: avoid the feature that needs it (deformable conv, rotated "
            "boxes, COCOEvaluator(use_fast_impl=True)), or install detectron2 with its extension "
            "built (see https://detectron2.readthedocs.io/en/latest/tutorials/install.html)."
        )

    op.__name__ = op_name
    return op


class _StandinModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _unavailable(name)


def make_compiled_ops_standin():
    """A new stand-in module object (registering it is :mod:`d2norm.patches`' job)."""
    mod = _StandinModule(
        "detectron2._C",
        "d2norm stand-in for detectron2's compiled ops (absent in this install): "
        "calling any op raises CompiledOpUnavailableError.",
    )
    setattr(mod, STANDIN_MARKER, True)
    mod.__spec__ = importlib.machinery.ModuleSpec("detectron2._C", None, origin="d2norm stand-in")
    mod.get_compiler_version = lambda: "none (detectron2 extension not built; d2norm stand-in)"
    mod.get_cuda_version = lambda: "none (detectron2 extension not built; d2norm stand-in)"
    mod.has_cuda = lambda: False
    return mod


def compiled_ops_available():
    """True iff detectron2's real compiled extension is importable."""
    try:
        from detectron2 import _C
    except ImportError:
        return False
    return not getattr(_C, STANDIN_MARKER, False)
