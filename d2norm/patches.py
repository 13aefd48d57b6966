"""Every change d2norm makes to detectron2, in one place.

d2norm extends detectron2 through its public seams (``get_norm`` names, a ``DefaultTrainer``
subclass, a ``DetectionCheckpointer`` subclass). Where no seam exists, it changes detectron2 in
the places listed here and nowhere else. :data:`PATCHES` enumerates them; each entry says why it
exists, when it is active (its *scope*) and how it is undone:

``compiled_ops_standin`` (scope: ``import d2norm``, process-wide)
    Registers a stand-in module ``detectron2._C`` (:mod:`d2norm.compat`) **only when detectron2
    cannot be imported without it**, i.e. ``import detectron2.layers`` fails for want of
    ``detectron2._C`` (detectron2 v0.6 installed without its compiled extension). detectron2
    builds from after January 2022 import without ``_C`` (and then use pycocotools in
    ``COCOEvaluator`` by themselves): nothing is installed there. With a real ``_C`` nothing is
    installed either. Undo: :func:`remove_compiled_ops_standin` (before any detectron2 module
    holds a reference to it, i.e. only in a fresh process).
``get_norm`` (scope: ``import d2norm`` and every ``d2norm.build_model``, process-wide)
    Rebinds ``get_norm`` in every loaded ``detectron2.*`` module that refers to detectron2's own
    function (the definition in ``detectron2.layers.batch_norm`` and every call site that
    imported it by name: ResNet, FPN, box/mask heads, RetinaNet, ...) to
    :func:`d2norm.norms.get_norm`, which builds d2norm's names and passes every other value to
    detectron2's function. ``build_model`` re-applies it for modules imported since. Undo:
    :func:`unpatch_get_norm`.
``create_ddp_model`` (scope: ``Trainer.__init__``)
    detectron2's ``create_ddp_model`` passes ``device_ids=[local_rank]``, which torch rejects for
    a CPU module; while ``DefaultTrainer.__init__`` runs, :func:`ddp_for_cpu_models` swaps
    ``detectron2.engine.defaults.create_ddp_model`` for a wrapper that passes ``device_ids=None``
    for CPU models in multi-process runs. Undone when ``__init__`` returns (or raises).
``local_process_group`` (scope: a worker process of :func:`d2norm.engine.launch.launch_cpu`)
    detectron2's ``comm.get_local_rank()`` / ``get_local_size()`` read the per-machine process
    group that detectron2's own (CUDA-only in v0.6) launcher sets up; :func:`local_process_group`
    creates it for gloo workers and sets ``comm._LOCAL_PROCESS_GROUP`` (detectron2 after v0.6
    has ``comm.create_local_process_group``, but it is cached per process and cannot be undone).
    Reset when the worker's main function returns.
``tracing_adapter_import`` (scope: one call of :func:`import_tracing_adapter`)
    detectron2 v0.6's ``detectron2.export/__init__`` imports caffe2, which torch 2 no longer
    ships; ``TracingAdapter`` itself needs none of it. If the package import fails, a bare
    package object stands in for ``detectron2.export`` while ``detectron2.export.flatten`` is
    imported; afterwards every ``detectron2.export*`` entry this added to ``sys.modules`` is
    removed again (the returned class keeps its module alive).

``import d2norm`` applies only the first two, what any model build needs. Nothing is left in
``sys.modules`` that detectron2 did not put there, except the ``_C`` stand-in where detectron2
cannot be imported without one.
"""

import contextlib
import importlib
import importlib.util
import os
import sys
import types
from collections import namedtuple

from .compat import STANDIN_MARKER, make_compiled_ops_standin

__all__ = [
    "PATCHES",
    "Patch",
    "install_compiled_ops_standin",
    "remove_compiled_ops_standin",
    "patch_get_norm",
    "unpatch_get_norm",
    "ddp_for_cpu_models",
    "local_process_group",
    "import_tracing_adapter",
]

#: One change to detectron2: ``name``, ``target`` (what is changed), ``why``, ``scope`` ("import",
#: "build", "trainer init", "worker process" or "call"), ``apply``/``undo`` (callables; for a
#: scoped patch ``apply`` is the context manager and ``undo`` None) and ``is_applied``.
Patch = namedtuple("Patch", ["name", "target", "why", "scope", "apply", "undo", "is_applied"])


# ----------------------------------------------------------------------------- detectron2._C
def _missing_c_error(e):
    return isinstance(e, ImportError) and ("_C" in str(e) or getattr(e, "name", "") == "detectron2._C")


def detectron2_needs_standin():
    """Whether ``detectron2.layers`` fails to import for want of ``detectron2._C``.

    Tries the import. Python removes the modules whose import raised (``detectron2.layers``);
    their submodules that did import are removed here too, so that a later import starts clean.
    Modules imported successfully elsewhere (``detectron2.utils``, ...) stay, as they would."""
    if "detectron2.layers" in sys.modules:
        return False
    before = set(sys.modules)
    try:
        import detectron2.layers  # noqa: F401
    except ImportError as e:
        if not _missing_c_error(e):
            raise
        for name in sorted(set(sys.modules) - before):
            parts = name.split(".")
            if any(".".join(parts[:i]) not in sys.modules for i in range(1, len(parts))):
                del sys.modules[name]  # its package failed to import
        return True
    return False


def _standin_installed():
    return bool(getattr(sys.modules.get("detectron2._C"), STANDIN_MARKER, False))


def install_compiled_ops_standin():
    """Register the ``detectron2._C`` stand-in if detectron2 cannot be imported without it.

    Idempotent. Returns True iff the stand-in is (now) the registered ``detectron2._C``."""
    if "detectron2._C" in sys.modules:
        return _standin_installed()
    try:
        import detectron2
    except ImportError:
        return False
    if importlib.util.find_spec("detectron2._C") is not None:
        return False  # the real extension exists: never shadow it
    if not detectron2_needs_standin():
        return False
    mod = make_compiled_ops_standin()
    sys.modules["detectron2._C"] = mod
    detectron2._C = mod
    return True


def remove_compiled_ops_standin():
    """Unregister the stand-in (modules that imported it keep their reference)."""
    if not _standin_installed():
        return False
    del sys.modules["detectron2._C"]
    detectron2 = sys.modules.get("detectron2")
    if detectron2 is not None and getattr(detectron2, "_C", None) is not None:
        del detectron2._C
    return True


# ----------------------------------------------------------------------------- get_norm
def _detectron2_modules():
    return [
        (n, m)
        for n, m in list(sys.modules.items())
        if m is not None and (n == "detectron2" or n.startswith("detectron2."))
    ]


def patch_get_norm():
    """Point every loaded ``detectron2.*`` module's ``get_norm`` at :func:`d2norm.norms.get_norm`.

    Imports ``detectron2.modeling`` first so that every model call site is loaded. Idempotent:
    returns the names of the modules patched by this call (empty when nothing was left)."""
    import detectron2.modeling  # noqa: F401  (loads every call site)

    from . import norms

    patched = []
    for name, module in _detectron2_modules():
        if module.__dict__.get("get_norm") is norms.detectron2_get_norm:
            module.get_norm = norms.get_norm
            patched.append(name)
    return patched


def unpatch_get_norm():
    """Give every ``detectron2.*`` module detectron2's own ``get_norm`` back; returns their names."""
    from . import norms

    restored = []
    for name, module in _detectron2_modules():
        if module.__dict__.get("get_norm") is norms.get_norm:
            module.get_norm = norms.detectron2_get_norm
            restored.append(name)
    return restored


def _get_norm_patched():
    from . import norms

    bn = sys.modules.get("detectron2.layers.batch_norm")
    return bn is not None and bn.get_norm is norms.get_norm


# ----------------------------------------------------------------------------- create_ddp_model
@contextlib.contextmanager
def ddp_for_cpu_models():
    """While active, detectron2's ``create_ddp_model`` wraps CPU models without ``device_ids``.

    ``broadcast_buffers=False`` (per-process norm statistics) and every other argument are
    passed through; CUDA models and single-process runs are unaffected."""
    from detectron2.engine import defaults
    from detectron2.utils import comm

    original = defaults.create_ddp_model

    def create_ddp_model(model, **kwargs):
        if comm.get_world_size() > 1 and all(p.device.type == "cpu" for p in model.parameters()):
            kwargs.setdefault("device_ids", None)
        return original(model, **kwargs)

    create_ddp_model._d2norm_patched = True
    defaults.create_ddp_model = create_ddp_model
    try:
        yield
    finally:
        defaults.create_ddp_model = original


def _ddp_swapped():
    defaults = sys.modules.get("detectron2.engine.defaults")
    return defaults is not None and getattr(defaults.create_ddp_model, "_d2norm_patched", False)


# ----------------------------------------------------------------------------- local process group
@contextlib.contextmanager
def local_process_group(num_per_machine, machine_rank):
    """Set detectron2's per-machine process group for this (gloo) worker; reset it on exit.

    Every process must enter it (``dist.new_group`` is collective)."""
    import torch.distributed as dist

    from detectron2.utils import comm

    saved = comm._LOCAL_PROCESS_GROUP
    for i in range(dist.get_world_size() // num_per_machine):
        group = dist.new_group(list(range(i * num_per_machine, (i + 1) * num_per_machine)))
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group
    try:
        yield
    finally:
        comm._LOCAL_PROCESS_GROUP = saved


def _local_group_set():
    comm = sys.modules.get("detectron2.utils.comm")
    return comm is not None and comm._LOCAL_PROCESS_GROUP is not None


# ----------------------------------------------------------------------------- detectron2.export
_tracing_adapter = None  # the class loaded without detectron2.export's __init__ (cached)


def _export_modules():
    return [n for n in sys.modules if n == "detectron2.export" or n.startswith("detectron2.export.")]


def import_tracing_adapter():
    """detectron2's ``TracingAdapter`` (``detectron2/export/flatten.py``), see the module docstring."""
    global _tracing_adapter
    try:
        from detectron2.export import TracingAdapter

        return TracingAdapter
    except ImportError:
        if _tracing_adapter is not None:
            return _tracing_adapter
    import detectron2

    for name in _export_modules():  # a package left half-imported by the failed attempt
        del sys.modules[name]
    pkg = types.ModuleType("detectron2.export")
    pkg.__path__ = [os.path.join(os.path.dirname(detectron2.__file__), "export")]
    pkg.__doc__ = "d2norm: detectron2.export without its caffe2-dependent __init__ (temporary)"
    sys.modules["detectron2.export"] = pkg
    try:
        _tracing_adapter = importlib.import_module("detectron2.export.flatten").TracingAdapter
        return _tracing_adapter
    finally:
        for name in _export_modules():
            del sys.modules[name]
        if getattr(detectron2, "export", None) is pkg:
            del detectron2.export


def _fake_export_present():
    mod = sys.modules.get("detectron2.export")
    return mod is not None and "d2norm" in (mod.__doc__ or "")


PATCHES = (
    Patch(
        "compiled_ops_standin",
        "sys.modules['detectron2._C']",
        "detectron2 v0.6 built without its extension cannot import detectron2.layers",
        "import",
        install_compiled_ops_standin,
        remove_compiled_ops_standin,
        _standin_installed,
    ),
    Patch(
        "get_norm",
        "get_norm in every loaded detectron2.* module",
        "d2norm's norm names at every detectron2 get_norm call site",
        "import, build",
        patch_get_norm,
        unpatch_get_norm,
        _get_norm_patched,
    ),
    Patch(
        "create_ddp_model",
        "detectron2.engine.defaults.create_ddp_model",
        "torch rejects device_ids for a CPU module (multi-process CPU training)",
        "trainer init",
        ddp_for_cpu_models,
        None,
        _ddp_swapped,
    ),
    Patch(
        "local_process_group",
        "detectron2.utils.comm._LOCAL_PROCESS_GROUP",
        "get_local_rank/size in gloo workers (detectron2 v0.6's launcher is CUDA-only)",
        "worker process",
        local_process_group,
        None,
        _local_group_set,
    ),
    Patch(
        "tracing_adapter_import",
        "sys.modules['detectron2.export'] (during the call)",
        "detectron2 v0.6's detectron2.export imports caffe2, which torch 2 lacks",
        "call",
        import_tracing_adapter,
        None,
        _fake_export_present,
    ),
)
