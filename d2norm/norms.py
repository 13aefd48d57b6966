"""The norm table: every normalization name d2norm defines, registered once.

Each :class:`NormSpec` in :data:`NORMS` says how to build the layer (its builder takes the
options as keyword arguments), which ``cfg.D2NORM`` keys those options come from
(:data:`CONFIG_SECTIONS` holds the sub-nodes and their defaults; ``add_d2norm_config`` writes
them), and what the layer can do (the capability flags). Every question "is this a norm / does
it need its conv / can it fold / how does it freeze / what state does it checkpoint" reads this
table: the preparation pass (:mod:`d2norm.modeling`), folding (:mod:`d2norm.deploy`), checkpoint
loading (:mod:`d2norm.weights`), the optimizer's norm rule and the non-finite guard.

**Options travel with the call**, never through module state:

* ``d2norm.norm("CBN", buffer_size=4)`` is a callable ``C -> layer`` with those options bound
  (the others at their defaults); pass it as ``norm=`` to any detectron2 module or LazyConfig;
* :func:`bind_norms` returns a copy of a yacs config whose ``MODEL.*.NORM`` names of d2norm
  norms are such callables with ``cfg.D2NORM``'s options: ``d2norm.build_model(cfg)`` builds
  from it, and so can ``detectron2.modeling.build_model(d2norm.bind_norms(cfg))``;
* a plain name (``get_norm("CBN", C)``) builds with the defaults. A model built that way from a
  config with other options (detectron2's ``build_model(cfg)``) is refused by
  ``d2norm.prepare_model(model, cfg)``, which names the key.

A bound norm is also the name (a ``str`` equal to it), so detectron2's code that compares
``NORM`` with names (``norm == "SyncBN"``, ``bias=not norm``) behaves as with the plain name.

:func:`get_norm` is detectron2's ``get_norm`` extended with the table's names;
:func:`d2norm.patches.patch_get_norm` makes every detectron2 call site use it. Other values go
to detectron2's own ``get_norm`` (:data:`detectron2_get_norm`) unchanged. An unknown name raises
:class:`UnknownNormError` (a ``KeyError``, as in detectron2, and a ``ValueError``) listing the
valid ones; errors raised while building a layer propagate unchanged.

**Adding a norm** (e.g. "BCN"): write its layer in ``d2norm/layers/<method>.py`` (equation in
the docstring, options as validated keyword arguments stored under the same attribute names;
derive from :class:`~d2norm.layers.base.ConvFedNorm` if it needs its conv, define
``eval_statistics()`` if its eval map is a per-channel affine), export it from
``d2norm/layers/__init__.py``, add its ``cfg.D2NORM`` sub-node to :data:`CONFIG_SECTIONS` (if it
has options of its own) and one :class:`NormSpec` to :data:`NORMS`. Nothing else lists norms.
"""

import dataclasses
from types import MappingProxyType
from typing import Callable, Mapping, Optional, Tuple

import torch
from torch import nn

import detectron2.layers.batch_norm as d2bn
from detectron2.layers import FrozenBatchNorm2d

from .layers import (
    BatchChannelNorm2d,
    BatchChannelNormWS,
    BatchNormWS,
    BatchRenorm2d,
    ConvFedNorm,
    CrossIterationBatchNorm2d,
    CycleNormList,
    EvalStatistics,
    EvoNormS0,
    FilterResponseNorm2d,
    FrozenStatisticsBatchNorm2d,
    GroupNorm,
    GroupNormWS,
    MovingAverageBatchNorm2d,
    SyncBatchNorm2d,
)
from .layers.conv_link import remove_hook

__all__ = [
    "CONFIG_SECTIONS",
    "NORMS",
    "NormSpec",
    "UnknownNormError",
    "bind_norms",
    "build_norm",
    "config_options",
    "detectron2_get_norm",
    "detectron2_norm_names",
    "end_pass_checks",
    "eval_statistics",
    "frozen_batch_norm_of",
    "get_norm",
    "is_norm_layer",
    "is_patched",
    "layer_options",
    "norm",
    "norm_from_config",
    "norm_layer_types",
    "spec_of",
]

# ------------------------------------------------------------------ config sub-nodes
#: ``cfg.D2NORM.<SECTION>.<KEY>`` and their defaults (``add_d2norm_config`` writes them).
CONFIG_SECTIONS = {
    # Group Normalization (also used by "GN+WS"): number of groups, epsilon.
    "GN": {"NUM_GROUPS": 32, "EPS": 1e-5},
    # Weight Standardization (for "GN+WS" / "BN+WS" / "BCN+WS"), per output channel of the conv:
    #   CONVENTION "sqrt_var" (default):  W_hat = (W - mean) / sqrt(var_biased + EPS)
    #   CONVENTION "std_plus_eps":        W_hat = (W - mean) / (std_unbiased + EPS)
    #   CONVENTION "sqrt_unbiased_var":   W_hat = (W - mean) / sqrt(var_unbiased + EPS)
    # Use "std_plus_eps" for weights trained with mmcv's ConvWS2d / the original WS code, and
    # "sqrt_unbiased_var" for the BCN authors' ImageNet BCN+WS weights.
    "WS": {"EPS": 1e-5, "CONVENTION": "sqrt_var"},
    # Cross-Iteration BN: window of BUFFER_SIZE iterations (incl. the current one); plain BN
    # for the first BURNIN_ITERS training iterations. The official code's buffer_num counts the
    # previous iterations only: official buffer_num = BUFFER_SIZE - 1 (its "buffer3" configs are
    # BUFFER_SIZE 4). GRAD_THROUGH_COMPENSATION False: the paper's / official gradient (the
    # compensated past statistics are constants); True: also differentiate them w.r.t. the
    # current conv weight (see docs/cbn_diagnosis.md).
    "CBN": {
        "BUFFER_SIZE": 3,
        "BURNIN_ITERS": 0,
        "EPS": 1e-5,
        "MOMENTUM": 0.1,
        "GRAD_THROUGH_COMPENSATION": False,
    },
    # Moving-Average BN: BUFFER_SIZE = simulated batch / real batch per device.
    "MABN": {"BUFFER_SIZE": 16, "WARMUP_ITERS": 100, "MOMENTUM": 0.98, "EPS": 1e-5},
    # Batch Renormalization ("BRN"): r clipped to [1/r_max(t), r_max(t)], d to [-d_max(t),
    # d_max(t)]; r_max ramps linearly 1 -> R_MAX and d_max 0 -> D_MAX from RAMP_START_ITER to
    # R_MAX_END_ITER / D_MAX_END_ITER (the paper's schedule: 5000 -> 40000 / 25000 steps).
    # MOMENTUM is the update rate of the running mean / std (the paper's fast update, 0.01). In
    # schedules of a few hundred iterations from scratch, 0.01 lags the weights and the r / d
    # correction costs AP: use BN's 0.1 there (docs/small_batch_study.md, "BRN's update rate").
    "BRN": {
        "R_MAX": 3.0,
        "D_MAX": 5.0,
        "RAMP_START_ITER": 5000,
        "R_MAX_END_ITER": 40000,
        "D_MAX_END_ITER": 25000,
        "MOMENTUM": 0.01,
        "EPS": 1e-5,
    },
    # Filter Response Normalization + TLU ("FRN"): eps = EPS (+ |learned eps| with LEARNABLE_EPS,
    # initialized to LEARNED_EPS_INIT). REPLACE_RELU: the TLU replaces the ReLU of the box / mask
    # head convs (see d2norm/modeling/sites.py for every call site).
    "FRN": {"EPS": 1e-6, "LEARNABLE_EPS": False, "LEARNED_EPS_INIT": 1e-4, "REPLACE_RELU": True},
    # EvoNorm-S0 ("EvoNorm-S0"): group std over NUM_GROUPS groups; REPLACE_RELU as for FRN.
    "EVONORM": {"NUM_GROUPS": 32, "EPS": 1e-5, "REPLACE_RELU": True},
    # Batch-Channel Normalization ("BCN", "BCN+WS"; d2norm/layers/batch_channel_norm.py): a batch
    # normalization, then a group normalization with one affine per group. NUM_GROUPS: groups of
    # the channel part (the authors' code: 32). EPS: epsilon of both parts (the authors': 1e-5).
    # MODE "estimate": micro-batch BCN, normalize with the estimated mean / variance (the paper's
    # Algorithm 1, the authors' EstBN); "batch": large-batch BCN, the batch's statistics (BN);
    # with several processes the statistics are those of the whole batch. MOVING_SPEED: update
    # rate r of the estimates, in (0, 1]. MOVING_SPEED_SCHEDULE "cumulative": r_t = max(r,
    # 1/(t+1)) (the first step sets the estimates, then the average of the steps so far until it
    # reaches r); "constant": r_t = r. The authors' code leaves r to the training script (its
    # buffer starts at 0); see the layer's docstring. AFFINE "group": one gamma, beta per group
    # after the channel normalization (the authors' code); "channel": one per channel.
    "BCN": {
        "NUM_GROUPS": 32,
        "EPS": 1e-5,
        "MODE": "estimate",
        "MOVING_SPEED": 0.1,
        "MOVING_SPEED_SCHEDULE": "cumulative",
        "AFFINE": "group",
    },
}


# ------------------------------------------------------------------ the table
@dataclasses.dataclass(frozen=True)
class NormSpec:
    """One norm name: how to build it and what it can do.

    * ``layer``: the layer class (``isinstance`` against it answers "which norm is this");
    * ``options``: ``{keyword: "SECTION.KEY"}``, the builder's keyword options and the
      ``cfg.D2NORM`` key each comes from (the layer stores each under the keyword's name);
    * ``build``: ``(channels, **options) -> layer``; None: ``layer(channels, **options)``;
    * ``running_stats``: training advances state (running statistics, history) once per call,
      so a module that applies the norm several times per forward (RetinaNet's head) gets one
      copy per call;
    * ``needs_conv``: a :class:`~d2norm.layers.base.ConvFedNorm`, given its conv by the
      preparation pass;
    * ``foldable``: its eval map is a per-channel affine (``eval_statistics``), folded into the
      conv by ``d2norm.deploy.fold``;
    * ``per_sample``: normalizes with per-sample statistics (same map in train and eval);
    * ``activation``: carries its activation, placed per call site by the preparation pass;
    * ``frozen``: ``layer -> module`` computing its eval map with no state and no trainable
      parameter (a frozen stage, ``convert_frozen_norms``), or None (left as it is);
    * ``history`` / ``history_counters``: buffers whose shape follows the options (restarted
      when a checkpoint's do not fit) and the counters set to 0 when they restart.
    """

    name: str
    layer: type
    options: Mapping[str, str] = dataclasses.field(default_factory=dict)
    build: Optional[Callable] = None
    running_stats: bool = False
    needs_conv: bool = False
    foldable: bool = False
    per_sample: bool = False
    activation: bool = False
    frozen: Optional[Callable] = None
    history: Tuple[str, ...] = ()
    history_counters: Tuple[str, ...] = ()

    def defaults(self):
        """``{keyword: default}`` from :data:`CONFIG_SECTIONS`."""
        return {kw: _config_default(key) for kw, key in self.options.items()}


def _config_default(key):
    section, name = key.split(".")
    return CONFIG_SECTIONS[section][name]


def eval_statistics(norm):
    """``norm``'s eval map in batch-norm form (:class:`~d2norm.layers.base.EvalStatistics`), or
    None where it has none: a layer's own ``eval_statistics()``, else torch's BN / SyncBN with
    running statistics and detectron2's ``FrozenBatchNorm2d``."""
    own = getattr(norm, "eval_statistics", None)
    if callable(own):
        return own()
    if isinstance(norm, FrozenBatchNorm2d) or (
        isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.running_var is not None
    ):
        return EvalStatistics(norm.weight, norm.bias, norm.running_mean, norm.running_var, norm.eps)
    return None


def frozen_batch_norm_of(norm):
    """detectron2 ``FrozenBatchNorm2d`` computing ``norm``'s eval map (:func:`eval_statistics`)."""
    stats = eval_statistics(norm)
    if stats is None:
        raise ValueError(
            f"{type(norm).__name__} has no running statistics (track_running_stats="
            "False), so it has no eval map to freeze. Fix: keep it trainable."
        )
    frozen = FrozenBatchNorm2d(stats.var.numel(), eps=stats.eps)
    with torch.no_grad():
        if stats.weight is not None:
            frozen.weight.copy_(stats.weight)
        if stats.bias is not None:
            frozen.bias.copy_(stats.bias)
        frozen.running_var.copy_(stats.var.reshape(-1))
        if stats.mean is not None:
            frozen.running_mean.copy_(stats.mean)
    return frozen.to(next(iter(norm.buffers())).device)


def _grouped(cls):
    """Builder of a grouped norm: fewer channels than groups gives the class's ``type_probe``
    (detectron2 v0.6's ``RetinaNetHead`` builds ``get_norm(norm, 1)`` only to read the layer type;
    a layer that refuses to run serves that, and ``d2norm.prepare_model`` names it if it is ever
    part of a model)."""

    def build(channels, num_groups, **options):
        if isinstance(num_groups, int) and not isinstance(num_groups, bool) and 0 < channels < num_groups:
            return cls.type_probe(num_groups, channels, **options)
        if cls is EvoNormS0:
            return cls(channels, num_groups=num_groups, **options)
        return cls(num_groups, channels, **options)

    return build


def _frozen_detectron2_bn(channels):
    return FrozenBatchNorm2d(channels)


def _bcn(cls):
    """Builder of BCN / BCN+WS (channels first in its signature; a type probe for fewer channels
    than groups, as :func:`_grouped`)."""

    def build(channels, num_groups, **options):
        if isinstance(num_groups, int) and not isinstance(num_groups, bool) and 0 < channels < num_groups:
            return cls.type_probe(num_groups, channels, **options)
        return cls(channels, num_groups, **options)

    return build


def _frozen_bcn(layer):
    """BCN in a frozen stage: its batch part becomes the ``FrozenBatchNorm2d`` of its eval map; the
    channel part (per-sample statistics) keeps its frozen affine, as a frozen GN does."""
    if not isinstance(layer.bn, FrozenBatchNorm2d):
        layer.bn = frozen_batch_norm_of(layer.bn)
    return layer


_GN = {"num_groups": "GN.NUM_GROUPS", "eps": "GN.EPS"}
_WS = {"ws_eps": "WS.EPS", "ws_convention": "WS.CONVENTION"}
_BN_LIKE = dict(running_stats=True, foldable=True, frozen=frozen_batch_norm_of)
_BCN = {
    "num_groups": "BCN.NUM_GROUPS",
    "eps": "BCN.EPS",
    "mode": "BCN.MODE",
    "moving_speed": "BCN.MOVING_SPEED",
    "schedule": "BCN.MOVING_SPEED_SCHEDULE",
    "affine": "BCN.AFFINE",
}
# the batch part's estimates advance per call; only the batch part folds (d2norm.deploy.fold)
_BCN_FLAGS = dict(running_stats=True, frozen=_frozen_bcn)

_SPECS = (
    NormSpec("BN*", FrozenBatchNorm2d, build=_frozen_detectron2_bn, foldable=True),
    NormSpec("FrozenBN", FrozenBatchNorm2d, build=_frozen_detectron2_bn, foldable=True),
    NormSpec("FrozenStatsBN", FrozenStatisticsBatchNorm2d, foldable=True, frozen=frozen_batch_norm_of),
    NormSpec("SyncBN", SyncBatchNorm2d, **_BN_LIKE),
    NormSpec("GN", GroupNorm, _GN, build=_grouped(GroupNorm), per_sample=True),
    NormSpec(
        "GN+WS", GroupNormWS, {**_GN, **_WS}, build=_grouped(GroupNormWS), needs_conv=True, per_sample=True
    ),
    NormSpec("BN+WS", BatchNormWS, _WS, needs_conv=True, **_BN_LIKE),
    NormSpec(
        "CBN",
        CrossIterationBatchNorm2d,
        {
            "buffer_size": "CBN.BUFFER_SIZE",
            "burnin": "CBN.BURNIN_ITERS",
            "eps": "CBN.EPS",
            "momentum": "CBN.MOMENTUM",
            "grad_through_compensation": "CBN.GRAD_THROUGH_COMPENSATION",
        },
        needs_conv=True,
        history=CrossIterationBatchNorm2d.history_buffers,
        history_counters=("hist_count", "hist_pos"),
        **_BN_LIKE,
    ),
    NormSpec(
        "MABN",
        MovingAverageBatchNorm2d,
        {
            "buffer_size": "MABN.BUFFER_SIZE",
            "warmup_iters": "MABN.WARMUP_ITERS",
            "momentum": "MABN.MOMENTUM",
            "eps": "MABN.EPS",
        },
        needs_conv=True,
        history=("buffer_x2", "buffer_gz"),
        history_counters=("iters",),
        **_BN_LIKE,
    ),
    NormSpec(
        "BRN",
        BatchRenorm2d,
        {
            "r_max": "BRN.R_MAX",
            "d_max": "BRN.D_MAX",
            "ramp_start": "BRN.RAMP_START_ITER",
            "r_max_end": "BRN.R_MAX_END_ITER",
            "d_max_end": "BRN.D_MAX_END_ITER",
            "momentum": "BRN.MOMENTUM",
            "eps": "BRN.EPS",
        },
        **_BN_LIKE,
    ),
    NormSpec(
        "FRN",
        FilterResponseNorm2d,
        {
            "eps": "FRN.EPS",
            "learnable_eps": "FRN.LEARNABLE_EPS",
            "learned_eps_init": "FRN.LEARNED_EPS_INIT",
            "replace_relu": "FRN.REPLACE_RELU",
        },
        per_sample=True,
        activation=True,
    ),
    NormSpec(
        "EvoNorm-S0",
        EvoNormS0,
        {"num_groups": "EVONORM.NUM_GROUPS", "eps": "EVONORM.EPS", "replace_relu": "EVONORM.REPLACE_RELU"},
        build=_grouped(EvoNormS0),
        per_sample=True,
        activation=True,
    ),
    NormSpec("BCN", BatchChannelNorm2d, _BCN, build=_bcn(BatchChannelNorm2d), **_BCN_FLAGS),
    NormSpec(
        "BCN+WS",
        BatchChannelNormWS,
        {**_BCN, **_WS},
        build=_bcn(BatchChannelNormWS),
        needs_conv=True,
        **_BCN_FLAGS,
    ),
)

#: name -> :class:`NormSpec`, for every name d2norm builds (they take precedence over
#: detectron2's meaning of the same name).
NORMS = MappingProxyType({spec.name: spec for spec in _SPECS})


def spec_of(module):
    """The :class:`NormSpec` of the d2norm norm ``module`` is (by its exact class first, then
    by ``isinstance``), or None."""
    for spec in _SPECS:
        if type(module) is spec.layer:
            return spec
    for spec in _SPECS:
        if isinstance(module, spec.layer):
            return spec
    return None


# ------------------------------------------------------------------ building
def _unknown_options_error(name, given):
    spec = NORMS[name]
    valid = ", ".join(f"{kw} ({'D2NORM.' + key})" for kw, key in spec.options.items()) or "none"
    return TypeError(
        f"d2norm.norm({name!r}): unknown option(s) {', '.join(sorted(given))}. Valid options of "
        f"{name!r} (keyword and config key): {valid}."
    )


def build_norm(name, channels, **options):
    """Build the d2norm norm ``name`` for ``channels`` channels; ``options`` as keywords (see
    :data:`NORMS`; the others at their defaults).

    A layer whose conv needs a weight transform (GN+WS, BN+WS: Weight Standardization; MABN:
    weight centralization) refuses to train until ``prepare_preceding_conv`` has run on it
    (:func:`d2norm.prepare_model` does that), so a model built without the preparation pass
    (e.g. by ``detectron2.modeling.build_model``) stops at its first training step instead of
    silently training without the transform. (CBN refuses unbound training by itself.) Likewise
    a layer whose method the pass completes elsewhere (FRN / EvoNorm-S0: the activation placed
    per call site; a norm with a frozen form, e.g. BRN, in a frozen stage: replaced by it)
    refuses its first training step until the pass has visited it (:func:`end_pass_checks`).
    Layers constructed directly (``FilterResponseNorm2d(64)``) are left alone."""
    if name not in NORMS:
        raise _unknown_norm_error(name)
    spec = NORMS[name]
    unknown = set(options) - set(spec.options)
    if unknown:
        raise _unknown_options_error(name, unknown)
    kwargs = {**spec.defaults(), **options}
    layer = (spec.build or spec.layer)(channels, **kwargs)
    if (isinstance(layer, ConvFedNorm) and layer.conv_transform() is not None) or (
        spec.activation or spec.frozen is not None
    ):
        _require_prepared(layer)
    return layer


class BoundNorm(str):
    """A d2norm norm name with its options bound: ``bound(C)`` builds the layer.

    Equal to (and hashing as) the plain name, so code comparing a ``NORM`` value with names
    treats it as that name; ``options`` holds the bound keywords. Made by :func:`norm`."""

    def __new__(cls, name, options):
        self = super().__new__(cls, name)
        self.options = dict(options)
        return self

    @property
    def name(self):
        return str(self)

    def __call__(self, channels):
        return build_norm(str(self), channels, **self.options)

    def __repr__(self):
        args = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"d2norm.norm({str(self)!r}{args})"

    def __reduce__(self):
        return (BoundNorm, (str(self), self.options))

    def __deepcopy__(self, memo):
        return BoundNorm(str(self), self.options)


def norm(name, **options):
    """The d2norm norm ``name`` with ``options`` (keywords, see :data:`NORMS`): a callable
    ``C -> layer`` for detectron2's ``norm=`` arguments (``get_norm`` calls it) and LazyConfigs
    (``L(d2norm.norm)(name="CBN", buffer_size=4)``). Options not given take their defaults.
    Unknown names and options raise here; bad values raise when a layer is built."""
    if not isinstance(name, str) or name not in NORMS:
        raise _unknown_norm_error(name)
    unknown = set(options) - set(NORMS[name].options)
    if unknown:
        raise _unknown_options_error(name, unknown)
    return BoundNorm(name, options)


def config_options(cfg, name):
    """``{keyword: value}`` of the d2norm norm ``name`` read from ``cfg.D2NORM`` (keys the
    config lacks take their defaults)."""
    node = cfg.get("D2NORM", None) if hasattr(cfg, "get") else None
    out = {}
    for kw, key in NORMS[name].options.items():
        section, leaf = key.split(".")
        sub = node.get(section, None) if node is not None else None
        out[kw] = sub[leaf] if sub is not None and leaf in sub else _config_default(key)
    return out


def norm_from_config(cfg, name):
    """``name`` bound to ``cfg.D2NORM``'s options if it is a d2norm norm; else ``name``."""
    if isinstance(name, str) and not isinstance(name, BoundNorm) and name in NORMS:
        return norm(name, **config_options(cfg, name))
    return name


def bind_norms(cfg):
    """A copy of the yacs config ``cfg`` whose ``MODEL.**.NORM`` values naming d2norm norms are
    bound to ``cfg.D2NORM``'s options (:func:`norm_from_config`); ``cfg`` is not changed. Build
    a model from it with detectron2's ``build_model`` (``d2norm.build_model`` does)."""
    out = cfg.clone()
    frozen = out.is_frozen()
    out.defrost()

    def visit(node):
        for key, value in list(node.items()):
            if hasattr(value, "items"):
                visit(value)
            elif key == "NORM" and isinstance(value, str):
                dict.__setitem__(node, key, norm_from_config(cfg, value))  # yacs accepts only plain str

    visit(out.get("MODEL", {}))
    if frozen:
        out.freeze()
    return out


def layer_options(layer):
    """``{keyword: value}`` of a d2norm norm layer's options (its attributes; see
    :class:`NormSpec`), or None for a layer that is no d2norm norm or a type probe."""
    spec = spec_of(layer)
    if spec is None or isinstance(layer.__dict__.get("unusable"), str):
        return None
    return {kw: getattr(layer, kw) for kw in spec.options if hasattr(layer, kw)}


# ------------------------------------------------------------------ layers built by name
def _layer_name(norm):
    name = getattr(norm, "_d2norm_name", None)
    return f"{type(norm).__name__} '{name}'" if name else repr(norm)


_PREPARE_FIX = (
    "build the model with d2norm.build_model(cfg) (detectron2.modeling.build_model does not prepare "
    "it); in a LazyConfig wrap the model, model = L(d2norm.lazy.prepared)(model=L(GeneralizedRCNN)"
    "(...)) (configs/lazy/common/mask_rcnn_fpn.py), or call d2norm.lazy.prepared(model) / "
    "d2norm.prepare_model(model) on the built model"
)


def _unvisited_reason(norm):
    """Why training ``norm`` (built by name) without the preparation pass would silently use
    another method (besides an unprepared conv), or None."""
    spec = spec_of(norm)
    if spec.activation and getattr(norm, "activation", False):
        return (
            "carries its activation, which the preparation pass places per call site (kept where "
            "a ReLU follows, dropped before residual additions, shortcuts and in the FPN): without "
            "the pass it runs at every site"
        )
    params = list(norm.parameters(recurse=False))
    if spec.frozen is not None and params and not any(p.requires_grad for p in params):
        return (
            "has all its parameters frozen (a frozen stage, e.g. ResNet freeze_at), and the "
            "preparation pass replaces such a layer by its frozen form (detectron2's "
            "FrozenBatchNorm2d of its eval map): without the pass it keeps normalizing with batch "
            "statistics and updating its running statistics inside the frozen stage"
        )
    return None


def _check_prepared(norm, args):
    """Forward pre-hook of a layer built by name (:func:`build_norm`): the first training forward
    raises while the layer still needs the preparation pass (its conv, or what
    :func:`_unvisited_reason` names); once one passes, the hook is removed."""
    if not norm.training:
        return None
    if isinstance(norm, ConvFedNorm) and norm.conv_transform() is not None and not norm.conv_prepared:
        raise RuntimeError(
            f"{_layer_name(norm)} needs {norm.conv_requirement}, but the conv before it was never "
            f"prepared, so training would silently use another normalization. Fix: {_PREPARE_FIX}; "
            "for a standalone layer, call norm.prepare_preceding_conv(conv) with the conv whose "
            "output it normalizes."
        )
    reason = _unvisited_reason(norm)
    if reason:
        raise RuntimeError(
            f"The {spec_of(norm).name!r} layer {_layer_name(norm)} was built by name (get_norm / "
            f"d2norm.norm) and {reason}. The model skipped d2norm's model-preparation pass, so "
            f"training would silently use another method. Fix: {_PREPARE_FIX}."
        )
    remove_hook(norm._forward_pre_hooks, _check_prepared)
    return None


def _require_prepared(norm):
    if not any(h is _check_prepared for h in norm._forward_pre_hooks.values()):
        norm.register_forward_pre_hook(_check_prepared)
    return norm


def end_pass_checks(model):
    """Mark every layer of ``model`` as visited by the preparation pass (removes the check
    :func:`build_norm` installs on layers built by name); run at the end of the pass."""
    for module in model.modules():
        remove_hook(module._forward_pre_hooks, _check_prepared)
    return model


# ------------------------------------------------------------------ detectron2's get_norm
#: Names detectron2's get_norm has had (v0.6 has all but "LN"); see detectron2_norm_names().
_DETECTRON2_CANDIDATES = ("BN", "SyncBN", "FrozenBN", "GN", "nnSyncBN", "naiveSyncBN", "naiveSyncBN_N", "LN")


def _resolve_detectron2_get_norm():
    fn = d2bn.get_norm
    if is_patched(fn):  # another copy of this module rebound it already
        fn = getattr(fn, "__wrapped_original__", fn)
    return fn


def is_patched(fn):
    return getattr(fn, "_d2norm_patched", False)


#: detectron2's own ``get_norm`` (what :func:`get_norm` falls back to for other names).
detectron2_get_norm = _resolve_detectron2_get_norm()


def _probe_detectron2_names():
    names = []
    for name in _DETECTRON2_CANDIDATES:
        try:
            detectron2_get_norm(name, 32)
        except KeyError:
            continue
        except Exception:  # known but not buildable here (e.g. needs a process group)
            pass
        names.append(name)
    return tuple(names)


#: The names the installed detectron2's own ``get_norm`` accepts (probed at import).
_DETECTRON2_NAMES = _probe_detectron2_names()


def detectron2_norm_names():
    """The names the installed detectron2's own ``get_norm`` accepts."""
    return _DETECTRON2_NAMES


def _valid_names():
    return sorted(set(NORMS) | set(detectron2_norm_names()) | {""})


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
    if isinstance(norm, BoundNorm):
        return norm(out_channels)
    if isinstance(norm, str) and norm in NORMS:
        return build_norm(norm, out_channels)
    if not isinstance(norm, str):
        return detectron2_get_norm(norm, out_channels)
    try:
        return detectron2_get_norm(norm, out_channels)
    except KeyError as e:
        if e.args == (norm,):  # detectron2's name lookup, not an error inside a layer
            raise _unknown_norm_error(norm) from None
        raise


get_norm._d2norm_patched = True
get_norm.__wrapped_original__ = detectron2_get_norm


# ------------------------------------------------------------------ what is a norm
_DETECTRON2_NORM_TYPES = tuple(
    t
    for t in (getattr(d2bn, n, None) for n in ("FrozenBatchNorm2d", "CycleBatchNormList", "LayerNorm"))
    if isinstance(t, type)
)
_NORM_LAYER_TYPES = (
    (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm, CycleNormList)
    + _DETECTRON2_NORM_TYPES
    + tuple(dict.fromkeys(spec.layer for spec in _SPECS))
)


def norm_layer_types():
    """The one rule for what a normalization layer is: torch's BN / SyncBN / InstanceNorm
    (``_NormBase``), GN, LN, LRN; detectron2's ``FrozenBatchNorm2d``, ``CycleBatchNormList`` and
    ``LayerNorm`` (where the installed version has it); every layer of the table
    (:data:`NORMS`) and per-level list (``CycleNormList``)."""
    return _NORM_LAYER_TYPES


def is_norm_layer(module):
    """Whether ``module`` is a normalization layer (see :func:`norm_layer_types`)."""
    return isinstance(module, _NORM_LAYER_TYPES)
