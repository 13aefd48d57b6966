"""Norm names for detectron2's ``get_norm``.

:func:`get_norm` is detectron2's ``get_norm`` extended with d2norm's names;
:func:`d2norm.patches.patch_get_norm` makes every detectron2 call site use it. Names d2norm
defines are built by :func:`build_norm`; every other value goes to detectron2's own
``get_norm`` (:data:`detectron2_get_norm`) unchanged. An unknown name raises a ``ValueError``
listing the valid ones.

Options of the built layers (GN groups, CBN window, MABN buffer, ...) come from
``cfg.D2NORM``; :func:`norm_options_from_config` makes them active while a model is built.
"""
import contextlib
import copy

from torch import nn

__all__ = [
    "D2NORM_NORMS",
    "DETECTRON2_NORMS",
    "build_norm",
    "get_norm",
    "detectron2_get_norm",
    "is_patched",
    "norm_options_from_config",
    "current_norm_options",
]

# Options used when no config is active (the defaults of add_d2norm_config).
_DEFAULT_OPTIONS = {
    "GN": {"NUM_GROUPS": 32, "EPS": 1e-5},
    "WS": {"EPS": 1e-5, "CONVENTION": "sqrt_var"},
    "CBN": {"BUFFER_SIZE": 3, "BURNIN_ITERS": 0, "EPS": 1e-5, "MOMENTUM": 0.1},
    "MABN": {"BUFFER_SIZE": 16, "WARMUP_ITERS": 100, "MOMENTUM": 0.98, "EPS": 1e-5},
}
_options = copy.deepcopy(_DEFAULT_OPTIONS)


def current_norm_options():
    return copy.deepcopy(_options)


@contextlib.contextmanager
def norm_options_from_config(cfg):
    """Make ``cfg.D2NORM``'s options active for norms built inside the ``with`` block."""
    global _options
    saved = _options
    new = copy.deepcopy(_DEFAULT_OPTIONS)
    node = cfg.get("D2NORM", None) if hasattr(cfg, "get") else None
    if node is not None:
        for method, values in new.items():
            sub = node.get(method, None)
            if sub is not None:
                for key in values:
                    if key in sub:
                        values[key] = sub[key]
    _options = new
    try:
        yield new
    finally:
        _options = saved


def _frozen_bn(c):
    from detectron2.layers import FrozenBatchNorm2d

    return FrozenBatchNorm2d(c)


def _sync_bn(c):
    from .layers.sync_batch_norm import SyncBatchNorm2d

    return SyncBatchNorm2d(c)


def _gn(c):
    from .layers.group_norm import GroupNorm

    o = _options["GN"]
    return GroupNorm(o["NUM_GROUPS"], c, eps=o["EPS"])


def _gn_ws(c):
    from .layers.group_norm import GroupNormWS

    o, ws = _options["GN"], _options["WS"]
    return GroupNormWS(
        o["NUM_GROUPS"], c, eps=o["EPS"], ws_eps=ws["EPS"], ws_convention=ws["CONVENTION"]
    )


def _bn_ws(c):
    from .layers.group_norm import BatchNormWS

    ws = _options["WS"]
    return BatchNormWS(c, ws_eps=ws["EPS"], ws_convention=ws["CONVENTION"])


def _cbn(c):
    from .layers.cross_iteration_batch_norm import CrossIterationBatchNorm2d

    o = _options["CBN"]
    return CrossIterationBatchNorm2d(
        c, buffer_size=o["BUFFER_SIZE"], burnin=o["BURNIN_ITERS"], eps=o["EPS"], momentum=o["MOMENTUM"]
    )


def _mabn(c):
    from .layers.moving_average_batch_norm import MovingAverageBatchNorm2d

    o = _options["MABN"]
    return MovingAverageBatchNorm2d(
        c,
        buffer_size=o["BUFFER_SIZE"],
        warmup_iters=o["WARMUP_ITERS"],
        momentum=o["MOMENTUM"],
        eps=o["EPS"],
    )


#: Names d2norm builds (they take precedence over detectron2's meaning of the same name).
D2NORM_NORMS = {
    "BN*": _frozen_bn,
    "FrozenBN": _frozen_bn,
    "SyncBN": _sync_bn,
    "GN": _gn,
    "GN+WS": _gn_ws,
    "BN+WS": _bn_ws,
    "CBN": _cbn,
    "MABN": _mabn,
}
#: Names passed through to detectron2's own get_norm (those of v0.6; newer versions add more).
DETECTRON2_NORMS = ("BN", "nnSyncBN", "naiveSyncBN", "naiveSyncBN_N", "LN")


def _valid_names():
    return sorted(set(D2NORM_NORMS) | set(DETECTRON2_NORMS) | {""})


def build_norm(norm, out_channels):
    """Build the norm layer named ``norm`` for ``out_channels`` channels (a d2norm name)."""
    return D2NORM_NORMS[norm](out_channels)


def _resolve_detectron2_get_norm():
    import detectron2.layers.batch_norm as bn_module

    fn = bn_module.get_norm
    if is_patched(fn):  # another copy of this module rebound it already
        fn = getattr(fn, "__wrapped_original__", fn)
    return fn


def is_patched(fn):
    return getattr(fn, "_d2norm_patched", False)


#: detectron2's own ``get_norm`` (what :func:`get_norm` falls back to for other names).
detectron2_get_norm = _resolve_detectron2_get_norm()
_original_get_norm = detectron2_get_norm


def _unknown_norm_error(norm):
    return ValueError(
        f"Unknown normalization {norm!r} (MODEL.RESNETS.NORM / MODEL.FPN.NORM / "
        f"MODEL.ROI_BOX_HEAD.NORM / MODEL.ROI_MASK_HEAD.NORM). Valid names: "
        f"{', '.join(repr(n) for n in _valid_names())}. Fix: use one of them, or pass a callable "
        "that takes the channel count and returns an nn.Module."
    )


def get_norm(norm, out_channels):
    """detectron2's ``get_norm`` extended with d2norm's names (see module docstring)."""
    if isinstance(norm, str) and norm in D2NORM_NORMS:
        return build_norm(norm, out_channels)
    try:
        return _original_get_norm(norm, out_channels)
    except KeyError:
        raise _unknown_norm_error(norm) from None


get_norm._d2norm_patched = True
get_norm.__wrapped_original__ = detectron2_get_norm


def norm_layer_types():
    """Module types that count as normalization layers (for tests and model preparation)."""
    from detectron2.layers import FrozenBatchNorm2d

    return (nn.modules.batchnorm._NormBase, nn.GroupNorm, FrozenBatchNorm2d)
