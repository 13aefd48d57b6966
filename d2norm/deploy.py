"""Deployment transforms: turn a trained model into a cheaper one computing the same function.

Each transform works in place on a model (typically after ``model.eval()`` and loading the
final weights), returns the model, and leaves a model that needs no d2norm-specific code at
inference beyond the norm layers that remain.

* :func:`fold_weight_standardization`: bake every conv weight transform (Weight
  Standardization of "GN+WS" / "BN+WS", weight centralization and the weight centering of
  "MABN") into a plain conv weight, removing the per-forward transform.
* :func:`fold`: bake the weight transforms, then fold every eval-mode norm whose eval map is a
  per-channel affine (BN, SyncBN, BN+WS, BN*, FrozenStatsBN, CBN, MABN, BRN: the norm table's
  ``foldable``) into the conv before it, visiting the (conv, conv.norm) pairs of
  :func:`iter_conv_norm_pairs` (:func:`eval_affine` gives a norm's per-channel
  ``(scale, shift)`` from its eval map, :func:`fold_affine_into_conv` applies it); GN stays.
  ``tools/deploy.py`` runs it on trained weights, checks the detections, traces and saves.
"""

import logging
import os

import torch
from torch import nn

from .layers import ConvFedNorm
from .layers.weight_transforms import bake_weight_transforms, get_weight_transform
from .norms import eval_statistics, spec_of
from .patches import import_tracing_adapter  # noqa: F401  (re-exported)

__all__ = [
    "fold_weight_standardization",
    "has_weight_transforms",
    "iter_conv_norm_pairs",
    "eval_affine",
    "is_foldable",
    "fold_affine_into_conv",
    "fold",
    "load_folded_model",
    "import_tracing_adapter",
]

_logger = logging.getLogger(__name__)


def iter_conv_norm_pairs(model):
    """Yield ``(name, conv, norm)`` for every ``nn.Conv2d`` carrying a norm module as
    ``conv.norm`` (detectron2's ``Conv2d(..., norm=...)``), in ``named_modules`` order."""
    for name, module in model.named_modules():
        norm = getattr(module, "norm", None)
        if isinstance(module, nn.Conv2d) and isinstance(norm, nn.Module):
            yield name, module, norm


def fold_weight_standardization(model):
    """Replace each transformed conv weight by its transformed value, in place; returns ``model``.

    For a conv parametrized by :class:`~d2norm.layers.weight_transforms.WeightStandardization`
    (or ``WeightCentralization``), ``conv.weight`` becomes a plain ``nn.Parameter`` holding Ŵ,
    computed once from the current raw weight; the parametrization is removed, so the state dict
    key returns from ``conv.parametrizations.weight.original`` to ``conv.weight``. Other
    parametrizations are left alone. Safe on a ``copy.deepcopy`` of a model (the original keeps
    its transforms), and the baked convs lose the hook that renamed ``weight`` keys, so a baked
    state dict loads into a baked model.

    Outputs before and after are equal up to float32 rounding: the same Ŵ tensor is used, only
    computed once instead of per forward, so conv outputs are bit-identical and a whole GN+WS
    Mask R-CNN in eval mode agrees within ``atol=1e-5, rtol=1e-5`` (tested; bit-identical on
    CPU in practice). Training after folding trains the standardized weight directly, i.e. plain
    conv + norm: fold only for inference / export.

    A checkpoint saved from the unfolded model still loads into the folded one only through the
    transform (load it before folding); :class:`~d2norm.checkpoint.D2NormCheckpointer` maps the
    raw weight onto ``conv.weight``, which would then be used *un*-standardized.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"fold_weight_standardization expects an nn.Module (a built model), got {type(model).__name__}."
        )
    _own_parametrized_classes(model)
    bake_weight_transforms(model)
    return model


def has_weight_transforms(model):
    """Whether any module of ``model`` still carries a d2norm weight transform."""
    return any(get_weight_transform(m) is not None for m in model.modules())


# ------------------------------------------------------------------------------------------
# Folding eval-mode norms into the preceding conv
#
# In eval mode BN, SyncBN, BN*, CBN, MABN and BRN are per-channel affine maps y -> s*y + t (their
# eval map, ``eval_statistics``), so conv followed by norm is one conv with W' = W*s (per output
# channel) and b' = b*s + t. GN (and GN+WS's GN) normalizes with per-sample statistics and stays.


def _eval_map(norm):
    spec = spec_of(norm)
    return eval_statistics(norm) if spec is None or spec.foldable else None


def is_foldable(norm):
    """Whether ``norm`` is a per-channel affine map in eval mode (see :func:`eval_affine`)."""
    return _eval_map(norm) is not None


def eval_affine(norm):
    """``(scale, shift)``, float64 per-channel tensors with ``norm(y) == y*scale + shift`` in
    eval mode (channels on dim 1), from the norm's eval map
    (:func:`d2norm.norms.eval_statistics`): ``scale = γ/√(var + ε)``, ``shift = β − mean·scale``
    (MABN has no mean; BRN's var + ε is its running σ²).

    Raises ``TypeError`` for norms without such a form (GN, LN: per-sample statistics) and
    ``ValueError`` for a BN that normalizes with batch statistics in eval
    (``track_running_stats=False``).
    """
    stats = _eval_map(norm)
    if stats is not None:
        return stats.scale_shift()
    if isinstance(norm, nn.modules.batchnorm._BatchNorm):
        raise ValueError(
            f"{type(norm).__name__} has no running statistics (track_running_stats=False): in "
            "eval it normalizes with batch statistics, which no conv can represent. Fix: keep "
            "this layer unfolded, or train with running statistics."
        )
    raise TypeError(
        f"{type(norm).__name__} is not a per-channel affine map in eval mode (it normalizes with "
        "per-sample statistics, like GN), so it cannot be folded into a conv; it stays."
    )


def fold_affine_into_conv(conv, scale, shift):
    """Make ``conv`` compute ``conv(x) * scale + shift`` (per output channel), in place.

    ``W' = W·scale`` (each output channel's kernel), ``b' = b·scale + shift`` (``b = 0`` if the
    conv has no bias; a bias parameter is then created). Computed in float64 and stored in the
    conv's dtype. The conv weight must be a plain parameter (bake weight transforms first:
    :func:`fold_weight_standardization`). Returns ``conv``.
    """
    from torch.nn.utils import parametrize

    if not isinstance(conv, nn.Conv2d) or getattr(conv, "transposed", False):
        raise TypeError(f"fold_affine_into_conv expects an nn.Conv2d, got {type(conv).__name__}.")
    if parametrize.is_parametrized(conv, "weight"):
        raise ValueError(
            "The conv weight is parametrized (weight standardization / "
            "centralization). Fix: call fold_weight_standardization(model) first "
            "(fold(model) does)."
        )
    c = conv.out_channels
    scale = torch.as_tensor(scale, dtype=torch.float64).reshape(-1)
    shift = torch.as_tensor(shift, dtype=torch.float64).reshape(-1)
    if scale.numel() != c or shift.numel() != c:
        raise ValueError(
            f"scale/shift have {scale.numel()}/{shift.numel()} values for a conv with {c} output channels."
        )
    with torch.no_grad():
        w = conv.weight
        scale, shift = scale.to(w.device), shift.to(w.device)
        new_w = w.detach().to(torch.float64) * scale.view(-1, *([1] * (w.dim() - 1)))
        b = conv.bias.detach().to(torch.float64) if conv.bias is not None else torch.zeros_like(scale)
        new_b = b * scale + shift
        w.copy_(new_w.to(w.dtype))
        if conv.bias is None:
            conv.bias = nn.Parameter(new_b.to(w.dtype), requires_grad=w.requires_grad)
        else:
            conv.bias.copy_(new_b.to(conv.bias.dtype))
    return conv


def _own_parametrized_classes(model):
    """Give each parametrized module of ``model`` its own copy of its parametrized class.

    torch's ``parametrize`` generates one class per module, but ``copy.deepcopy`` shares it
    between the module and its copy, and ``remove_parametrizations`` deletes the ``weight``
    property from that class: baking a deep copy would leave the original model without a
    ``weight``. With a private class per module, baking touches only ``model``."""
    from torch.nn.utils import parametrize

    for module in model.modules():
        if parametrize.is_parametrized(module):
            cls = type(module)
            module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))


def fold(model):
    """Fold every foldable eval-mode norm into the conv before it, in place; returns ``model``
    (in eval mode).

    1. Weight Standardization / weight centralization are baked into the conv weights
       (:func:`fold_weight_standardization`).
    2. For each detectron2 ``Conv2d`` with a ``norm`` (:func:`iter_conv_norm_pairs`) that is
       BN, SyncBN, BN+WS, BN* (FrozenBN), CBN, MABN or BRN: ``(s, t) = eval_affine(norm)``,
       :func:`fold_affine_into_conv`, ``conv.norm = None`` (CBN lets go of the conv).
    3. GN (also the GN of GN+WS) and any other norm stay as they are.

    The folded model computes the eval-mode function of the original (float32 rounding apart;
    exact in float64) and is for inference only: its norms no longer learn. ``model.fold_report``
    lists the folded and the kept layers.
    """
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold expects an nn.Module (a built model), got {type(model).__name__}.")
    model.eval()
    fold_weight_standardization(model)
    folded, kept = [], []
    for name, conv, norm in list(iter_conv_norm_pairs(model)):
        if not is_foldable(norm):
            kept.append((name, type(norm).__name__))
            continue
        scale, shift = eval_affine(norm)
        fold_affine_into_conv(conv, scale, shift)
        conv.norm = None
        if isinstance(norm, ConvFedNorm):
            norm.release_conv()  # CBN's input hand-over
        folded.append((name, type(norm).__name__))
    model.fold_report = {"folded": folded, "kept": kept}
    _logger.info(
        "Folded %d norm layers into their convs; %d kept (%s).",
        len(folded),
        len(kept),
        ", ".join(sorted({t for _, t in kept})) or "none",
    )
    return model


def load_folded_model(cfg, path):
    """Build ``cfg``'s model, fold it, and load weights saved from a folded model (e.g. by
    ``tools/deploy.py``); returns the model in eval mode."""
    from .checkpoint import CheckpointError
    from .modeling import build_model

    if not os.path.isfile(path):
        raise CheckpointError(
            f"Folded weights file not found: {path!r}. Fix: run tools/deploy.py "
            "to create it, or pass the path it wrote (<output>/model_folded.pth)."
        )
    model = fold(build_model(cfg))
    state = torch.load(path, map_location=cfg.MODEL.DEVICE, weights_only=True)
    state = state.get("model", state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path!r} does not fit the folded model of this config (missing: {missing[:5]}, "
            f"unexpected: {unexpected[:5]}). Fix: use the config the weights were folded with."
        )
    return model
