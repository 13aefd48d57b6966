"""Norm names for detectron2's ``get_norm``: the one place where detectron2 is patched.

``patch_get_norm()`` replaces the ``get_norm`` reference in every loaded ``detectron2.*`` module
(the definition in ``detectron2.layers.batch_norm`` and each call site that imported it by name:
ResNet, FPN, box/mask heads, RetinaNet, ...). It is idempotent. Names d2norm defines are built by
:func:`build_norm`; every other value goes to detectron2's own ``get_norm`` unchanged. An
unknown name raises a ``ValueError`` listing the valid ones.

Options of the built layers (GN groups, CBN window, MABN buffer, ...) come from
``cfg.D2NORM``; :func:`norm_options_from_config` makes them active while a model is built.
"""
import contextlib
import copy
import sys

from torch import nn

__all__ = [
    "D2NORM_NORMS",
    "DETECTRON2_NORMS",
    "build_norm",
    "patch_get_norm",
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
    "BRN": {"R_MAX": 3.0, "D_MAX": 5.0, "RAMP_START_ITER": 5000, "R_MAX_END_ITER": 40000,
            "D_MAX_END_ITER": 25000, "MOMENTUM": 0.01, "EPS": 1e-5},
    "FRN": {"EPS": 1e-6, "LEARNABLE_EPS": False, "LEARNED_EPS_INIT": 1e-4, "REPLACE_RELU": True},
    "EVONORM": {"NUM_GROUPS": 32, "EPS": 1e-5, "REPLACE_RELU": True},
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


def _brn(c):
    from .layers.batch_renorm import BatchRenorm2d

    o = _options["BRN"]
    return BatchRenorm2d(
        c, r_max=o["R_MAX"], d_max=o["D_MAX"], ramp_start=o["RAMP_START_ITER"],
        r_max_end=o["R_MAX_END_ITER"], d_max_end=o["D_MAX_END_ITER"], momentum=o["MOMENTUM"], eps=o["EPS"],
    )


def _frn(c):
    from .layers.filter_response_norm import FilterResponseNorm2d

    o = _options["FRN"]
    return FilterResponseNorm2d(
        c, eps=o["EPS"], learnable_eps=o["LEARNABLE_EPS"], learned_eps_init=o["LEARNED_EPS_INIT"],
        replace_relu=o["REPLACE_RELU"],
    )


def _evonorm_s0(c):
    from .layers.evonorm import EvoNormS0

    o = _options["EVONORM"]
    return EvoNormS0(c, num_groups=o["NUM_GROUPS"], eps=o["EPS"], replace_relu=o["REPLACE_RELU"])


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
    "BRN": _brn,
    "FRN": _frn,
    "EvoNorm-S0": _evonorm_s0,
}
#: Names passed through to detectron2's own get_norm (those of v0.6; newer versions add more).
DETECTRON2_NORMS = ("BN", "nnSyncBN", "naiveSyncBN", "naiveSyncBN_N", "LN")


def _valid_names():
    return sorted(set(D2NORM_NORMS) | set(DETECTRON2_NORMS) | {""})


def build_norm(norm, out_channels):
    """Build the norm layer named ``norm`` for ``out_channels`` channels (a d2norm name)."""
    return D2NORM_NORMS[norm](out_channels)


_original_get_norm = None


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


def is_patched(fn):
    return getattr(fn, "_d2norm_patched", False)


def patch_get_norm():
    """Point every loaded ``detectron2.*`` module's ``get_norm`` at :func:`get_norm`.

    Imports ``detectron2.modeling`` first so that all model call sites are loaded. Idempotent:
    returns the list of modules patched by this call (empty the second time).
    """
    global _original_get_norm
    import detectron2.layers.batch_norm as bn_module
    import detectron2.modeling  # noqa: F401  (loads every call site)

    if _original_get_norm is None:
        original = bn_module.get_norm
        if is_patched(original):  # another copy of this module patched it already
            original = getattr(original, "__wrapped_original__", original)
        _original_get_norm = original
        get_norm.__wrapped_original__ = original

    patched = []
    for name, module in list(sys.modules.items()):
        if not name.startswith("detectron2") or module is None:
            continue
        current = module.__dict__.get("get_norm")
        if current is _original_get_norm:
            module.get_norm = get_norm
            patched.append(name)
    return patched


def unpatch_get_norm():
    """Restore detectron2's own ``get_norm`` everywhere (mainly for tests)."""
    if _original_get_norm is None:
        return
    for name, module in list(sys.modules.items()):
        if name.startswith("detectron2") and module is not None:
            if module.__dict__.get("get_norm") is get_norm:
                module.get_norm = _original_get_norm


def norm_layer_types():
    """Module types that count as normalization layers (for tests and model preparation)."""
    from detectron2.layers import FrozenBatchNorm2d

    return (nn.modules.batchnorm._NormBase, nn.GroupNorm, FrozenBatchNorm2d)
