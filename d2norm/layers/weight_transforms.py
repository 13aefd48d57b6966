"""Weight centralization (MABN) and weight standardization (WS) for convolutions.

Both transforms act per output channel, over the ``in_channels/groups x kh x kw`` elements of
a conv kernel of shape ``(out, in/groups, kh, kw)`` (any weight with the output channel first
works):

* **Weight centralization** (MABN, Yan et al. 2020, the official ``CenConv2d``):
  ``W_hat = W - mean(W)``.
* **Weight standardization** (Qiao et al. 2019): ``W_hat = (W - mean(W)) / sqrt(var(W) + eps)``
  with the *biased* (population, divide by n) variance and ``eps`` added to the variance *inside*
  the square root (``convention="sqrt_var"``, the default; this is also what timm's
  ``StdConv2d`` computes). Note that mmcv's ``ConvWS2d`` and the original WS code actually
  divide by ``std_unbiased(W) + eps`` (torch's default ``std``, divide by n-1, eps outside the
  root); that variant is available as ``convention="std_plus_eps"`` for loading weights trained
  with those implementations. For a ResNet 3x3x256 kernel the two differ by ~0.5% per channel.

The transforms are applied with :mod:`torch.nn.utils.parametrize`, so the conv keeps its class
(a parametrized subclass of it) and its forward, the optimizer updates the raw weight
(``conv.parametrizations.weight.original``), and ``conv.weight`` is the transformed weight.
:func:`bake_weight_transforms` removes the parametrizations for deployment, leaving the
transformed weight as a plain parameter.

The parametrization moves the conv's state dict key from ``<conv>.weight`` to
``<conv>.parametrizations.weight.original``. Key renaming lives here, next to the transform that
creates the key: :func:`apply_weight_transform` lets ``load_state_dict`` accept the plain key
(:func:`bake_weight_transforms` removes that again), and :func:`remap_parametrized_keys` /
:func:`plain_weight_key` rename keys of whole checkpoints.

Cost: each transform is one ``autograd.Function`` (``_WeightTransform``) with an analytic
backward. Weight standardization (``sqrt_var``) is one batch-norm kernel on the weight viewed as
``(1, out, in*kh*kw)`` forward and one batch-norm backward kernel. The transformed weight is not
kept for the conv's backward: the norm after the conv (GN+WS, BN+WS, MABN) calls
:func:`release_transformed_weight` on its input, which swaps the ``W_hat`` the conv op saved for
the recipe ``(W, mean, scale)``, rebuilt with one kernel when the backward needs it; training
holds no second copy of every conv's weight between forward and backward. A WS conv costs 3 ATen
kernel ops per training step more than a plain conv (``benchmarks/kernels.py``).
"""

from typing import Tuple

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = [
    "centralize_weight",
    "standardize_weight",
    "WeightCentralization",
    "WeightStandardization",
    "apply_weight_transform",
    "bake_weight_transforms",
    "get_weight_transform",
    "check_ws_options",
    "release_transformed_weight",
    "WS_CONVENTIONS",
    "PARAMETRIZED_WEIGHT_SUFFIX",
    "plain_weight_key",
    "remap_parametrized_keys",
]

#: Weight Standardization conventions (config key ``D2NORM.WS.CONVENTION``).
WS_CONVENTIONS = ("sqrt_var", "std_plus_eps")


def check_ws_options(eps, convention):
    """Validate Weight Standardization options; the error names the config key and the fix."""
    if convention not in WS_CONVENTIONS:
        raise ValueError(
            f"Unknown Weight Standardization convention {convention!r}: D2NORM.WS.CONVENTION must be "
            f"one of {WS_CONVENTIONS}. "
            'Fix: set D2NORM.WS.CONVENTION "sqrt_var" (the paper\'s equation, default) or '
            '"std_plus_eps" (weights trained with mmcv ConvWS2d / the original WS code).'
        )
    if isinstance(eps, bool) or not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(
            f"D2NORM.WS.EPS must be a number >= 0, got {eps!r}. Fix: set D2NORM.WS.EPS (default 1e-5)."
        )


def _reduce_dims(w: torch.Tensor) -> Tuple[int, ...]:
    if w.dim() < 2:
        raise ValueError(
            f"weight transforms need a weight with an output-channel dim and at least one more "
            f"dim, got shape {tuple(w.shape)}"
        )
    return tuple(range(1, w.dim()))


_ONES = {}  # (device, dtype, C) -> a ones vector (never written)


def _ones(like, c):
    key = (like.device, like.dtype, c)
    t = _ONES.get(key)
    if t is None:
        t = _ONES[key] = torch.ones(c, dtype=like.dtype, device=like.device)
    return t


def _apply_affine(w3, mean, scale, ones):
    """``(w3 - mean) * scale`` per channel of ``w3`` (1, C, K) as one inference-mode batch norm
    (variance 1, eps 0: the normalizer is exactly 1); ``scale`` None: centralization."""
    return torch.batch_norm(w3, scale, None, mean, ones, False, 0.0, 0.0, False)


class _WeightTransform(torch.autograd.Function):
    """``W_hat = (W - mean) * scale`` per output channel, with an analytic backward that needs only
    ``W`` (the parameter itself), ``mean`` and ``scale``; nothing of the size of ``W`` is saved.

    * centralization: ``scale = 1``; ``dW = g - mean(g)``;
    * ``sqrt_var``: ``scale = 1 / sqrt(var_biased + eps)``; ``dW`` is the training-mode batch-norm
      input gradient of ``W`` (one fused kernel);
    * ``std_plus_eps``: ``scale = 1 / (std_unbiased + eps)``; with sigma = std_unbiased and n the
      fan-in, ``dW = scale * (g - mean(g) - W_hat * sum(g * W_hat) * (sigma + eps) / ((n - 1) sigma))``:
      the same batch-norm backward kernel, run with ``invstd' = sqrt(n scale / ((n - 1) sigma))``
      and weight ``scale / invstd'``.

    Each output carries the ``(W, mean, scale)`` it was made from (``_d2norm_recompute``): a conv
    prepared by :func:`apply_weight_transform` hands autograd that recipe instead of ``W_hat`` and
    recomputes ``W_hat`` (one kernel) when its backward needs it (see :func:`_pack_weight`)."""

    @staticmethod
    def forward(ctx, w, kind, eps):
        c = w.shape[0]
        w3 = w.detach().reshape(1, c, -1)
        n = w3.shape[2]
        ones = _ones(w3, c)
        bn_weight = bn_invstd = None
        if kind == "sqrt_var":
            out, mean, scale = torch.native_batch_norm(w3, None, None, None, None, True, 0.0, eps)
            bn_invstd = scale
        else:
            if kind == "centralization":
                mean, scale = w3.mean(2)[0], None
            else:  # std_plus_eps
                std, mean = torch.std_mean(w3[0], 1, correction=1)
                scale = torch.add(std, eps).reciprocal_()
                if w.requires_grad:
                    # invstd' = sqrt(n scale / ((n - 1) sigma)), weight' = scale / invstd'
                    bn_weight = torch.mul(std, scale).mul_((n - 1) / n).sqrt_()
                    bn_invstd = torch.div(scale, bn_weight)
            out = _apply_affine(w3, mean, scale, ones)
        out = out.reshape(w.shape)
        ctx.save_for_backward(w, mean, bn_weight, bn_invstd)
        ctx.kind, ctx.eps = kind, eps
        ctx.recipe = (mean, scale, ones)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        w, mean, bn_weight, bn_invstd = ctx.saved_tensors
        g3 = grad.reshape(1, w.shape[0], -1)
        if ctx.kind == "centralization":
            return grad - g3.mean(2, keepdim=True).reshape(w.shape[0], *([1] * (w.dim() - 1))), None, None
        w3 = w.reshape(1, w.shape[0], -1)
        gw = torch.ops.aten.native_batch_norm_backward(
            g3.contiguous(), w3, bn_weight, None, None, mean, bn_invstd, True, 0.0, [True, False, False]
        )[0]
        return gw.reshape(w.shape), None, None


def _transform(w: torch.Tensor, kind: str, eps: float = 0.0) -> torch.Tensor:
    _reduce_dims(w)
    out = _WeightTransform.apply(w, kind, eps)
    if out.requires_grad:
        out._d2norm_recompute = (w, out.grad_fn, out._version)
    return out


def centralize_weight(w: torch.Tensor) -> torch.Tensor:
    """``W - mean(W)``, the mean taken per output channel over all other dims."""
    return _transform(w, "centralization")


def standardize_weight(w: torch.Tensor, eps: float = 1e-5, convention: str = "sqrt_var") -> torch.Tensor:
    """Weight standardization, per output channel over all other dims.

    ``convention="sqrt_var"`` (default): ``(W - mean) / sqrt(var_biased + eps)``.
    ``convention="std_plus_eps"``: ``(W - mean) / (std_unbiased + eps)`` (mmcv ``ConvWS2d``,
    original WS code).
    """
    if convention not in WS_CONVENTIONS:
        raise ValueError(f"unknown WS convention {convention!r}; expected one of {WS_CONVENTIONS}")
    return _transform(w, convention, float(eps))


# ----------------------------------------------------------------------------- recompute in backward
# A norm that follows a transformed conv hands autograd, in place of the transformed weight W_hat
# the conv op saved for its backward, the recipe (raw weight, mean, scale), and W_hat is rebuilt
# (one kernel) when the backward runs: training keeps no copy of every conv's W_hat alive between
# forward and backward.


class _Recipe:
    __slots__ = ("weight", "version", "grad_fn")

    def __init__(self, weight, grad_fn):
        self.weight, self.version, self.grad_fn = weight, weight._version, grad_fn


def _unpack_weight(p):
    if not isinstance(p, _Recipe):
        return p
    if p.weight._version != p.version:
        raise RuntimeError(
            "The raw weight of a weight-transformed conv was modified in place between the forward "
            "and the backward (e.g. an optimizer step before backward); its gradient would be wrong."
        )
    mean, scale, ones = p.grad_fn.recipe
    w = p.weight
    with torch.no_grad():
        return _apply_affine(w.reshape(1, w.shape[0], -1), mean, scale, ones).reshape(w.shape)


def release_transformed_weight(y: torch.Tensor) -> None:
    """Called by a norm on its input ``y``: if ``y`` is the output of a conv whose weight is a
    d2norm weight transform (and the conv op saved that weight for its backward), store the
    recipe of the weight instead, to be rebuilt in the backward. Anything else: no change."""
    fn = y.grad_fn
    if fn is None or not hasattr(fn, "_raw_saved_weight"):
        return
    try:
        w = fn._saved_weight
    except RuntimeError:  # not saved / already released
        return
    made = getattr(w, "_d2norm_recompute", None) if w is not None else None
    if made is None or made[2] != w._version:  # not a transform output, or changed in place
        return
    recipe, ptr = _Recipe(made[0], made[1]), w.data_ptr()
    del w

    def pack(t):  # called at once, with the saved W_hat (detached)
        return recipe if t.data_ptr() == ptr else t

    try:
        fn._raw_saved_weight.register_hooks(pack, _unpack_weight)
    except RuntimeError:  # hooks already registered (the norm ran twice on one output)
        pass


class WeightCentralization(nn.Module):
    """Parametrization ``W -> W - mean(W)`` (per output channel) for ``register_parametrization``."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return centralize_weight(w)

    def transform_config(self) -> tuple:
        return ("centralization",)


class WeightStandardization(nn.Module):
    """Parametrization ``W -> standardize_weight(W, eps, convention)``; see the module docstring."""

    def __init__(self, eps: float = 1e-5, convention: str = "sqrt_var"):
        super().__init__()
        check_ws_options(eps, convention)
        self.eps = float(eps)
        self.convention = convention

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return standardize_weight(w, self.eps, self.convention)

    def transform_config(self) -> tuple:
        return ("standardization", self.eps, self.convention)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, convention={self.convention}"


_TRANSFORM_TYPES = (WeightCentralization, WeightStandardization)


def _describe(p: nn.Module) -> str:
    return f"{type(p).__name__}({p.extra_repr()})"


def get_weight_transform(conv: nn.Module):
    """The d2norm weight transform registered on ``conv.weight``, or None."""
    if not parametrize.is_parametrized(conv, "weight"):
        return None
    plist = list(conv.parametrizations["weight"])
    if len(plist) == 1 and isinstance(plist[0], _TRANSFORM_TYPES):
        return plist[0]
    return None


def apply_weight_transform(conv: nn.Module, transform: nn.Module) -> nn.Module:
    """Register ``transform`` as the parametrization of ``conv.weight``, idempotently.

    If the same kind of transform (same class and settings) is already registered this is a
    no-op; if ``conv.weight`` carries any other parametrization a ``RuntimeError`` is raised
    (two transforms stacked on one conv is almost always a configuration mistake, e.g. a GN+WS
    conv also being prepared for MABN). Returns ``conv``.
    """
    if not isinstance(transform, _TRANSFORM_TYPES):
        raise TypeError(
            f"transform must be a WeightCentralization or WeightStandardization, got {type(transform)}"
        )
    if not isinstance(getattr(conv, "weight", None), torch.Tensor):
        raise TypeError(f"{type(conv).__name__} has no tensor 'weight' to transform")
    if parametrize.is_parametrized(conv, "weight"):
        existing = list(conv.parametrizations["weight"])
        if (
            len(existing) == 1
            and type(existing[0]) is type(transform)
            and existing[0].transform_config() == transform.transform_config()
        ):
            _set_plain_weight_hook(conv, True)
            return conv
        raise RuntimeError(
            f"{type(conv).__name__}.weight already has the parametrization(s) "
            f"[{', '.join(_describe(p) for p in existing)}]; refusing to also apply "
            f"{_describe(transform)}. A conv may carry only one weight transform: check that "
            f"the conv is not prepared by two norms (e.g. GN+WS and MABN), or call "
            f"bake_weight_transforms() / parametrize.remove_parametrizations first."
        )
    parametrize.register_parametrization(conv, "weight", transform)
    _set_plain_weight_hook(conv, True)
    return conv


def bake_weight_transforms(module: nn.Module) -> nn.Module:
    """Remove every d2norm weight transform in ``module`` (recursively), in place.

    Each transformed weight becomes a plain ``nn.Parameter`` holding the transformed value
    (``leave_parametrized=True``), so the model computes exactly the same function without the
    per-forward transform cost. Parametrizations that are not d2norm transforms are left alone.
    Returns ``module``.
    """
    targets = [m for m in module.modules() if get_weight_transform(m) is not None]
    for m in targets:
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    for m in module.modules():
        if not parametrize.is_parametrized(m, "weight"):
            _set_plain_weight_hook(m, False)
    return module


# ------------------------------------------------------------------ state dict keys
#: The state dict key suffix of a parametrized conv's raw weight.
PARAMETRIZED_WEIGHT_SUFFIX = "parametrizations.weight.original"


def plain_weight_key(key):
    """``X.parametrizations.weight.original`` -> ``X.weight``; other keys unchanged."""
    suffix = PARAMETRIZED_WEIGHT_SUFFIX
    return key[: -len(suffix)] + "weight" if key.endswith(suffix) else key


def remap_parametrized_keys(checkpoint_state_dict, model_state_dict_keys):
    """Rename checkpoint keys ``X.weight`` to ``X.parametrizations.weight.original`` where the
    model holds the latter (and not the former), and the reverse (a checkpoint saved from a
    prepared model loaded into a baked / plain one). Pure: returns a new dict."""
    suffix = PARAMETRIZED_WEIGHT_SUFFIX
    keys = set(model_state_dict_keys)
    out = {}
    for k, v in checkpoint_state_dict.items():
        if k.endswith(".weight") and k not in keys:
            candidate = k[: -len("weight")] + suffix
            if candidate in keys:
                k = candidate
        elif k.endswith(suffix) and k not in keys:
            candidate = k[: -len(suffix)] + "weight"
            if candidate in keys:
                k = candidate
        out[k] = v
    return out


def _load_plain_weight_into_parametrized(state_dict, prefix, *args, **kwargs):
    """Load-state-dict pre-hook: accept ``<conv>.weight`` for a parametrized conv weight."""
    plain, original = prefix + "weight", prefix + PARAMETRIZED_WEIGHT_SUFFIX
    if plain in state_dict and original not in state_dict:
        state_dict[original] = state_dict.pop(plain)


def _set_plain_weight_hook(module, present):
    """Register (``present``) or remove the pre-hook above on ``module``; idempotent."""
    hooks = module._load_state_dict_pre_hooks
    mine = [k for k, h in hooks.items() if getattr(h, "hook", h) is _load_plain_weight_into_parametrized]
    if present and not mine:
        module._register_load_state_dict_pre_hook(_load_plain_weight_into_parametrized)
    elif not present:
        for key in mine:
            del hooks[key]
