"""Norm names for detectron2's ``get_norm``.

:func:`get_norm` is detectron2's ``get_norm`` extended with d2norm's names;
:func:`d2norm.patches.patch_get_norm` makes every detectron2 call site use it. Names d2norm
defines are built by :func:`build_norm`; every other value goes to detectron2's own
``get_norm`` (:data:`detectron2_get_norm`) unchanged. An unknown name raises
:class:`UnknownNormError` (a ``KeyError``, as in detectron2, and a ``ValueError``) listing the
valid ones; errors raised while building a layer propagate unchanged.

Options of the built layers (GN groups, CBN window, MABN buffer, ...) come from
``cfg.D2NORM``; :func:`norm_options_from_config` makes them active while a model is built.
"""

import contextlib
import copy

from torch import nn

__all__ = [
    "D2NORM_NORMS",
    "UnknownNormError",
    "build_norm",
    "detectron2_get_norm",
    "detectron2_norm_names",
    "get_norm",
    "is_norm_layer",
    "norm_layer_types",
    "is_patched",
    "norm_options_from_config",
    "current_norm_options",
]


def _default_options():
    """The option defaults, read from ``add_d2norm_config`` (their one source): every
    ``cfg.D2NORM`` sub-node except ``DATA``, as ``{method: {key: value}}``."""
    from detectron2.config import CfgNode

    from .config import add_d2norm_config

    node = add_d2norm_config(CfgNode()).D2NORM
    return {k: dict(v) for k, v in node.items() if isinstance(v, CfgNode) and k != "DATA"}


# Options used when no config is active (the defaults of add_d2norm_config).
_DEFAULT_OPTIONS = _default_options()
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


def _frozen_stats_bn(c):
    from .layers.frozen_statistics_batch_norm import FrozenStatisticsBatchNorm2d

    return FrozenStatisticsBatchNorm2d(c)


def _sync_bn(c):
    from .layers.sync_batch_norm import SyncBatchNorm2d

    return SyncBatchNorm2d(c)


def _group_norm(cls, c, **kwargs):
    groups = _options["GN"]["NUM_GROUPS"]
    if isinstance(groups, int) and not isinstance(groups, bool) and 0 < c < groups:
        # fewer channels than groups: no such GN exists. detectron2's RetinaNetHead builds one to
        # read the layer type (v0.6: get_norm(norm, 1)); a layer that refuses to run serves that,
        # and d2norm.prepare_model names it if it is ever part of a model.
        return cls.type_probe(groups, c, **kwargs)
    return cls(groups, c, **kwargs)


def _gn(c):
    from .layers.group_norm import GroupNorm

    return _group_norm(GroupNorm, c, eps=_options["GN"]["EPS"])


def _gn_ws(c):
    from .layers.group_norm import GroupNormWS

    ws = _options["WS"]
    return _group_norm(
        GroupNormWS, c, eps=_options["GN"]["EPS"], ws_eps=ws["EPS"], ws_convention=ws["CONVENTION"]
    )


def _bn_ws(c):
    from .layers.group_norm import BatchNormWS

    ws = _options["WS"]
    return BatchNormWS(c, ws_eps=ws["EPS"], ws_convention=ws["CONVENTION"])


def _cbn(c):
    from .layers.cross_iteration_batch_norm import CrossIterationBatchNorm2d

    o = _options["CBN"]
    return CrossIterationBatchNorm2d(
        c,
        buffer_size=o["BUFFER_SIZE"],
        burnin=o["BURNIN_ITERS"],
        eps=o["EPS"],
        momentum=o["MOMENTUM"],
        grad_through_compensation=o["GRAD_THROUGH_COMPENSATION"],
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
        c,
        r_max=o["R_MAX"],
        d_max=o["D_MAX"],
        ramp_start=o["RAMP_START_ITER"],
        r_max_end=o["R_MAX_END_ITER"],
        d_max_end=o["D_MAX_END_ITER"],
        momentum=o["MOMENTUM"],
        eps=o["EPS"],
    )


def _frn(c):
    from .layers.filter_response_norm import FilterResponseNorm2d

    o = _options["FRN"]
    return FilterResponseNorm2d(
        c,
        eps=o["EPS"],
        learnable_eps=o["LEARNABLE_EPS"],
        learned_eps_init=o["LEARNED_EPS_INIT"],
        replace_relu=o["REPLACE_RELU"],
    )


def _evonorm_s0(c):
    from .layers.evonorm import EvoNormS0

    o = _options["EVONORM"]
    groups, kwargs = o["NUM_GROUPS"], dict(eps=o["EPS"], replace_relu=o["REPLACE_RELU"])
    if isinstance(groups, int) and not isinstance(groups, bool) and 0 < c < groups:
        return EvoNormS0.type_probe(groups, c, **kwargs)  # RetinaNetHead's get_norm(norm, 1) probe
    return EvoNormS0(c, num_groups=groups, **kwargs)


def _bcn(c, ws=False):
    from .layers.batch_channel_norm import BatchChannelNorm2d, BatchChannelNormWS

    o = _options["BCN"]
    kwargs = dict(
        eps=o["EPS"],
        mode=o["MODE"],
        moving_speed=o["MOVING_SPEED"],
        schedule=o["MOVING_SPEED_SCHEDULE"],
        affine=o["AFFINE"],
    )
    cls = BatchChannelNorm2d
    if ws:
        cls, kwargs = (
            BatchChannelNormWS,
            dict(kwargs, ws_eps=_options["WS"]["EPS"], ws_convention=_options["WS"]["CONVENTION"]),
        )
    groups = o["NUM_GROUPS"]
    if isinstance(groups, int) and not isinstance(groups, bool) and 0 < c < groups:
        return cls.type_probe(groups, c, **kwargs)  # RetinaNetHead's get_norm(norm, 1) probe
    return cls(c, groups, **kwargs)


#: Names d2norm builds (they take precedence over detectron2's meaning of the same name).
D2NORM_NORMS = {
    "BN*": _frozen_bn,
    "FrozenBN": _frozen_bn,
    "FrozenStatsBN": _frozen_stats_bn,
    "SyncBN": _sync_bn,
    "GN": _gn,
    "GN+WS": _gn_ws,
    "BN+WS": _bn_ws,
    "CBN": _cbn,
    "MABN": _mabn,
    "BRN": _brn,
    "FRN": _frn,
    "EvoNorm-S0": _evonorm_s0,
    "BCN": _bcn,
    "BCN+WS": lambda c: _bcn(c, ws=True),
}
#: Names detectron2's get_norm has had (v0.6 has all but "LN"); see detectron2_norm_names().
_DETECTRON2_CANDIDATES = ("BN", "SyncBN", "FrozenBN", "GN", "nnSyncBN", "naiveSyncBN", "naiveSyncBN_N", "LN")
_detectron2_names = None


def detectron2_norm_names():
    """The names the installed detectron2's own ``get_norm`` accepts (probed once, on demand)."""
    global _detectron2_names
    if _detectron2_names is None:
        original = _original_get_norm
        if original is None:
            import detectron2.layers.batch_norm as bn_module

            original = getattr(bn_module.get_norm, "__wrapped_original__", bn_module.get_norm)
        names = []
        for name in _DETECTRON2_CANDIDATES:
            try:
                original(name, 32)
            except KeyError:
                continue
            except Exception:  # known but not buildable here (e.g. needs a process group)
                pass
            names.append(name)
        _detectron2_names = tuple(names)
    return _detectron2_names


def _valid_names():
    return sorted(set(D2NORM_NORMS) | set(detectron2_norm_names()) | {""})


def build_norm(norm, out_channels):
    """Build the norm layer named ``norm`` for ``out_channels`` channels (a d2norm name).

    A layer whose conv needs a weight transform (GN+WS, BN+WS: Weight Standardization; MABN:
    weight centralization) refuses to train until ``prepare_preceding_conv`` has run on it
    (:func:`d2norm.prepare_model` does that), so a model built without the preparation pass
    (e.g. by ``detectron2.modeling.build_model``) stops at its first training step instead of
    silently training without the transform. (CBN refuses unbound training by itself.)"""
    from .layers.conv_link import require_prepared_conv

    layer = D2NORM_NORMS[norm](out_channels)
    if callable(getattr(layer, "conv_transform", None)):
        require_prepared_conv(layer)
    return layer


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


class UnknownNormError(KeyError, ValueError):
    """An unknown normalization name. A ``KeyError`` (what detectron2's ``get_norm`` raises) and a
    ``ValueError``; its text is the plain message."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


def _unknown_norm_error(norm):
    return UnknownNormError(
        f"Unknown normalization {norm!r} (MODEL.RESNETS.NORM / MODEL.FPN.NORM / "
        f"MODEL.ROI_BOX_HEAD.NORM / MODEL.ROI_MASK_HEAD.NORM / MODEL.RETINANET.NORM). Valid names: "
        f"{', '.join(repr(n) for n in _valid_names())}. Fix: use one of them, or pass a callable "
        "that takes the channel count and returns an nn.Module."
    )


def get_norm(norm, out_channels):
    """detectron2's ``get_norm`` extended with d2norm's names (see module docstring).

    Errors raised while building a layer (including by a user's callable) propagate unchanged;
    only a string that names no norm raises :class:`UnknownNormError`."""
    if isinstance(norm, str) and norm in D2NORM_NORMS:
        return build_norm(norm, out_channels)
    if not isinstance(norm, str):
        return _original_get_norm(norm, out_channels)
    try:
        return _original_get_norm(norm, out_channels)
    except KeyError as e:
        if e.args == (norm,):  # detectron2's name lookup, not an error inside a layer
            raise _unknown_norm_error(norm) from None
        raise


get_norm._d2norm_patched = True
get_norm.__wrapped_original__ = detectron2_get_norm


def norm_layer_types():
    """The one rule for what a normalization layer is: torch's BN / SyncBN / InstanceNorm
    (``_NormBase``), GN, LN, LRN; detectron2's ``FrozenBatchNorm2d``, ``CycleBatchNormList`` and
    ``LayerNorm`` (where the installed version has it); every d2norm norm
    (:data:`d2norm.layers.NORM_TYPES`) and per-level list (``CycleNormList``)."""
    import detectron2.layers.batch_norm as d2bn

    from .layers import NORM_TYPES, CycleNormList

    d2_types = tuple(
        t
        for t in (getattr(d2bn, n, None) for n in ("FrozenBatchNorm2d", "CycleBatchNormList", "LayerNorm"))
        if isinstance(t, type)
    )
    return (
        (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm, CycleNormList)
        + d2_types
        + NORM_TYPES
    )


def is_norm_layer(module):
    """Whether ``module`` is a normalization layer (see :func:`norm_layer_types`)."""
    return isinstance(module, norm_layer_types())
