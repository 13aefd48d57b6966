"""Batch Renormalization (BRN; Ioffe, NeurIPS 2017), pure torch.

Per channel, over the ``m = N*H*W`` values of a training batch, with running estimates μ, σ::

    μ_B = mean(x)                      σ_B = √(mean((x − μ_B)²) + ε)      (biased variance)
    r   = stop_gradient(clip(σ_B / σ,        1/r_max(t), r_max(t)))
    d   = stop_gradient(clip((μ_B − μ) / σ,  −d_max(t),  d_max(t)))
    x̂   = (x − μ_B) / σ_B · r + d
    y   = γ·x̂ + β
    μ  ← μ + α·(μ_B − μ)               σ ← σ + α·(σ_B − σ)                (after r, d are computed)

r and d are constants in backward (the gradient flows through μ_B and σ_B as in BN; ∂L/∂γ =
Σ ∂L/∂y·x̂, ∂L/∂β = Σ ∂L/∂y). With r = 1, d = 0 this is BN. The running σ is a moving average of
σ_B (the paper's Algorithm 1), not of the variance.

Eval (inference): ``y = γ·(x − μ)/σ + β``, a per-channel affine map that folds into the conv
before it like BN (:func:`d2norm.deploy.eval_affine`).

Ramp (the paper's schedule, Section 5.1: "r_max = 1, d_max = 0 (i.e. simply batchnorm) for the
first 5000 training steps, after which these were gradually relaxed to reach r_max = 3 at 40k
steps, and d_max = 5 at 25k steps"). With ``t`` the number of training forwards before the
current one (the detectron2 iteration when training from scratch) and a linear relaxation::

    r_max(t) = 1 + (R_MAX − 1) · clip((t − RAMP_START_ITER) / (R_MAX_END_ITER − RAMP_START_ITER), 0, 1)
    d_max(t) =      D_MAX      · clip((t − RAMP_START_ITER) / (D_MAX_END_ITER − RAMP_START_ITER), 0, 1)

Defaults (config ``D2NORM.BRN.*``): R_MAX 3, D_MAX 5, RAMP_START_ITER 5000, R_MAX_END_ITER
40000, D_MAX_END_ITER 25000 (the paper's numbers, for ~130k-step ImageNet training; shorter
schedules should scale them, e.g. the synthetic recipe uses 50 / 400 / 250 for 600 iterations),
MOMENTUM α = 0.01 (the paper uses a fast update of the moving averages), EPS 1e-5.

Batch statistics are those of the process's own batch (as detectron2's ``"BN"``; no all-reduce).
The counter ``iters`` is a buffer (in the state dict, so a resumed run continues the ramp) and
advances once per training forward; every schedule decision is a tensor op (no host sync).
"""

import torch
from torch import nn

from .base import EvalStatistics

__all__ = ["BatchRenorm2d", "check_brn_options"]


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_count(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def check_brn_options(r_max, d_max, ramp_start, r_max_end, d_max_end, momentum, eps):
    """Raise ``ValueError`` naming the ``D2NORM.BRN`` key and the fix for a bad option."""
    if not _is_number(r_max) or not r_max >= 1.0:
        raise ValueError(
            f"D2NORM.BRN.R_MAX must be a number >= 1 (r is clipped to [1/R_MAX, R_MAX]), got "
            f"{r_max!r}. Fix: set D2NORM.BRN.R_MAX to 3 (the paper's value) or 1 for plain BN."
        )
    if not _is_number(d_max) or not d_max >= 0.0:
        raise ValueError(
            f"D2NORM.BRN.D_MAX must be a number >= 0 (d is clipped to [-D_MAX, D_MAX]), got "
            f"{d_max!r}. Fix: set D2NORM.BRN.D_MAX to 5 (the paper's value) or 0 for no shift."
        )
    for key, v in (
        ("RAMP_START_ITER", ramp_start),
        ("R_MAX_END_ITER", r_max_end),
        ("D_MAX_END_ITER", d_max_end),
    ):
        if not _is_count(v):
            raise ValueError(
                f"D2NORM.BRN.{key} must be an integer >= 0, got {v!r}. Fix: set it to "
                "an iteration count (paper: 5000 / 40000 / 25000)."
            )
    for key, v in (("R_MAX_END_ITER", r_max_end), ("D_MAX_END_ITER", d_max_end)):
        if v < ramp_start:
            raise ValueError(
                f"D2NORM.BRN.{key}={v} is before D2NORM.BRN.RAMP_START_ITER={ramp_start}: the ramp "
                f"would end before it starts. Fix: set D2NORM.BRN.{key} >= RAMP_START_ITER."
            )
    if not _is_number(momentum) or not 0.0 < momentum <= 1.0:
        raise ValueError(
            f"D2NORM.BRN.MOMENTUM must be in (0, 1] (the update rate α of the running mean / std), "
            f"got {momentum!r}. Fix: set D2NORM.BRN.MOMENTUM to 0.01 (default)."
        )
    if not _is_number(eps) or not eps > 0:
        raise ValueError(f"D2NORM.BRN.EPS must be > 0, got {eps!r}. Fix: set D2NORM.BRN.EPS to 1e-5.")


def _ramp(t, start, end):
    """clip((t − start)/(end − start), 0, 1) as a float tensor; a step at ``start`` if end == start."""
    if end > start:
        return ((t - start) / float(end - start)).clamp_(0.0, 1.0)
    return (t >= start).to(t.dtype)


class BatchRenorm2d(nn.Module):
    """Batch Renormalization for ``(N, C, H, W)`` inputs (``NORM: "BRN"``); see the module docstring.

    Args:
        num_features: C.
        r_max, d_max: final clipping bounds (``D2NORM.BRN.R_MAX`` >= 1, ``D2NORM.BRN.D_MAX`` >= 0).
        ramp_start, r_max_end, d_max_end: the ramp's iterations (``D2NORM.BRN.RAMP_START_ITER``,
            ``R_MAX_END_ITER``, ``D_MAX_END_ITER``).
        momentum: α in (0, 1], the moving-average update rate (``D2NORM.BRN.MOMENTUM``).
        eps: ε added to the batch variance (``D2NORM.BRN.EPS``).

    Parameters ``weight`` (γ), ``bias`` (β). Buffers (all in the state dict): ``running_mean``
    (μ), ``running_std`` (σ, which includes ε), ``iters`` (int64, training forwards so far).
    """

    def __init__(
        self,
        num_features,
        r_max=3.0,
        d_max=5.0,
        ramp_start=5000,
        r_max_end=40000,
        d_max_end=25000,
        momentum=0.01,
        eps=1e-5,
    ):
        super().__init__()
        check_brn_options(r_max, d_max, ramp_start, r_max_end, d_max_end, momentum, eps)
        self.num_features = int(num_features)
        self.r_max, self.d_max = float(r_max), float(d_max)
        self.ramp_start, self.r_max_end, self.d_max_end = ramp_start, r_max_end, d_max_end
        self.momentum, self.eps = float(momentum), float(eps)
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_std", torch.ones(num_features))
        self.register_buffer("iters", torch.zeros((), dtype=torch.int64))

    def extra_repr(self):
        return (
            f"{self.num_features}, r_max={self.r_max}, d_max={self.d_max}, ramp=({self.ramp_start}, "
            f"r: {self.r_max_end}, d: {self.d_max_end}), momentum={self.momentum}, eps={self.eps}"
        )

    def limits(self):
        """``(r_max(t), d_max(t))`` for the next training forward, as 0-dim float tensors."""
        t = self.iters.to(self.running_std.dtype)
        r_lim = 1.0 + (self.r_max - 1.0) * _ramp(t, self.ramp_start, self.r_max_end)
        d_lim = self.d_max * _ramp(t, self.ramp_start, self.d_max_end)
        return r_lim, d_lim

    def eval_statistics(self):
        """The eval map γ·(x − μ)/σ + β in batch-norm form (σ² = var + ε; see
        :mod:`d2norm.layers.base`); ``var`` in float64, so that var + ε gives σ back."""
        var = (self.running_std.detach().double().square() - self.eps).clamp_min(0.0)
        return EvalStatistics(self.weight, self.bias, self.running_mean, var, self.eps)

    def eval_scale_shift(self):
        """``(γ/σ, β − μ·γ/σ)``: :meth:`eval_statistics` as a per-channel affine (detached, in
        the dtype of the running statistics)."""
        scale, shift = self.eval_statistics().scale_shift()
        return scale.to(self.running_std.dtype), shift.to(self.running_std.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"BatchRenorm2d expects (N, C, H, W) input, got shape {tuple(x.shape)}")
        w, b = self.weight.view(1, -1, 1, 1), self.bias.view(1, -1, 1, 1)
        if x.numel() == 0:  # empty batch: an empty output connected to γ, β; no state update
            return x * w.to(x.dtype) + b.to(x.dtype)
        if not self.training:
            scale, shift = self.eval_scale_shift()
            return torch.addcmul(shift.view(1, -1, 1, 1).to(x.dtype), x, scale.view(1, -1, 1, 1).to(x.dtype))

        with torch.no_grad():
            # per-channel mean and biased variance in one fused pass (about 4x faster than
            # torch.var_mean over (0, 2, 3) on CPU)
            mean_b, var_b = torch.batch_norm_update_stats(x.detach(), None, None, 0.0)
            mean_b, var_b = mean_b.to(self.running_std.dtype), var_b.to(self.running_std.dtype)
            std_b = torch.sqrt(var_b + self.eps)
            r_lim, d_lim = self.limits()
            r = torch.minimum(torch.maximum(std_b / self.running_std, 1.0 / r_lim), r_lim)
            d = torch.minimum(torch.maximum((mean_b - self.running_mean) / self.running_std, -d_lim), d_lim)
            self.running_mean.lerp_(mean_b, self.momentum)
            self.running_std.lerp_(std_b, self.momentum)
            self.iters.add_(1)
        # y = γ·((x − μ_B)/σ_B·r + d) + β = BN_train(x; weight γ·r, bias β + γ·d), r and d constant
        return torch.batch_norm(
            x,
            self.weight * r,
            torch.addcmul(self.bias, self.weight, d),
            None,
            None,
            True,
            0.0,
            self.eps,
            torch.backends.cudnn.enabled,
        )
