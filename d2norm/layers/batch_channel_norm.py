"""Batch-Channel Normalization (BCN; Qiao, Wang, Liu, Shen & Yuille, "Micro-Batch Training with
Batch-Channel Normalization and Weight Standardization", arXiv:1911.09738), pure torch.

BCN is a batch normalization followed by a channel (group) normalization. For an input
``x`` of shape ``(N, C, H, W)``, G groups of C/G channels:

Batch part, per channel c (affine γ_b, β_b of C values):

* ``MODE "estimate"`` (the paper's micro-batch BCN, Algorithm 1; the authors' ``EstBN``). With
  estimates μ̂, σ̂² and the update rate r_t of training step t::

      μ̇_c  = mean_{n,h,w} x_{n,c,h,w}
      σ̇²_c = mean_{n,h,w} (x_{n,c,h,w} − μ̂_c)²         (around the estimate μ̂, before its update)
      μ̂_c ← μ̂_c + r_t·(μ̇_c − μ̂_c)
      σ̂²_c ← σ̂²_c + r_t·(σ̇²_c − σ̂²_c)
      ẋ = γ_b,c · (x − μ̂_c) / √(σ̂²_c + ε) + β_b,c       (the *updated* estimates)

  μ̂, σ̂² are constants for the gradient (no gradient flows through the statistics). Eval: the
  same map with the current estimates, no update.

* ``MODE "batch"`` (the paper's large-batch BCN: plain BN): ẋ = γ_b·(x − μ_B)/√(σ²_B + ε) + β_b
  with the batch's mean and biased variance (gradient through both, as BN), while the running
  mean / unbiased variance move toward them at rate r_t; eval uses the running statistics.

Channel part, per sample n and group g (the authors' ``BCNorm``: GN without its own affine, then
one affine per group)::

      y = γ_c,g · (ẋ − mean_{n,g}(ẋ)) / √(var_{n,g}(ẋ) + ε) + β_c,g

``AFFINE "group"`` (default, the authors' code: γ_c, β_c of G values) or ``"channel"`` (C values,
GN's usual affine). ε (``D2NORM.BCN.EPS``) is used in both parts (1e-5 in the authors' code).

Update rate (``D2NORM.BCN.MOVING_SPEED`` r, ``D2NORM.BCN.MOVING_SPEED_SCHEDULE``). The paper gives
r as an input of Algorithm 1; the authors' code holds it in a buffer (``estbn_moving_speed``) that
starts at 0 — estimates that never move — and that no released file sets: the schedule is left to
the training script, and no detection training script was released. d2norm sets it from t (the
buffer ``num_batches_tracked``: training steps so far, in the state dict, so a resumed run
continues the schedule exactly)::

      "cumulative" (default):  r_t = max(r, 1/(t + 1))
      "constant":              r_t = r

With ``"cumulative"`` the first step sets the estimates to that step's statistics (r_0 = 1) and
the next ones average the steps so far, until 1/(t+1) falls to r (t ≥ 1/r − 1), after which the
estimates move at r. This removes the bias of the initial μ̂ = 0, σ̂² = 1, which are not
statistics of any data: with ``"constant"`` a fresh layer normalizes its first ~1/r steps with
them. (In ``"batch"`` mode ``"cumulative"`` is torch BN's ``momentum=None`` average for the first
1/r steps, then BN's momentum r.) Default r = 0.1, torch BN's running-statistics momentum: at one
or two images per process, 1/r ≈ 10 steps of statistics are averaged, short enough to follow the
weights through a detection schedule's early iterations.

Processes: with several processes (``--num-gpus``) the statistics μ̇, σ̇² (``"estimate"``, no
gradient) or μ_B, σ²_B (``"batch"``, with gradient, as ``SyncBN``) are those of the whole batch,
reduced over all processes (:func:`d2norm.layers.sync_batch_norm.global_batch_stats`), so every
process keeps the same estimates; with one process, they are the process's batch. An empty batch
leaves the estimates and t alone (every process still takes part in the reduction).

Eval map and deployment: the batch part is a per-channel affine in eval
(:meth:`BCNBatchNorm2d.eval_scale_shift`) and folds into the conv before it
(:func:`d2norm.deploy.fold` replaces it by ``nn.Identity``); the channel part uses per-sample
statistics and stays. Frozen (``MODEL.BACKBONE.FREEZE_AT``): the batch part becomes the
``FrozenBatchNorm2d`` of its eval map (:func:`d2norm.convert_frozen_norms`), the channel part
keeps its frozen affine, as detectron2 leaves a frozen GN.

``"BCN+WS"`` (:class:`BatchChannelNormWS`) is BCN whose preceding conv is weight-standardized,
exactly as ``"GN+WS"`` (``D2NORM.WS.*``), the paper's pairing.
"""

import torch
from torch import nn
from torch.nn import functional as F

from .base import EvalStatistics, refuse_unusable
from .group_norm import _StandardizesPrecedingConv
from .sync_batch_norm import distributed_world_size, global_batch_stats
from .weight_transforms import check_ws_options

__all__ = [
    "BCN_MODES",
    "BCN_SCHEDULES",
    "BCN_AFFINES",
    "BCNBatchNorm2d",
    "BatchChannelNorm2d",
    "BatchChannelNormWS",
    "check_bcn_options",
]

#: ``D2NORM.BCN.MODE`` values.
BCN_MODES = ("estimate", "batch")
#: ``D2NORM.BCN.MOVING_SPEED_SCHEDULE`` values.
BCN_SCHEDULES = ("cumulative", "constant")
#: ``D2NORM.BCN.AFFINE`` values.
BCN_AFFINES = ("group", "channel")


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_bcn_options(num_groups, eps, mode, moving_speed, schedule, affine="group", num_channels=None):
    """Raise ``ValueError`` naming the ``D2NORM.BCN`` key and the fix for a bad option."""
    if not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups < 1:
        raise ValueError(
            f"D2NORM.BCN.NUM_GROUPS must be a positive integer, got {num_groups!r}. "
            "Fix: set D2NORM.BCN.NUM_GROUPS (default 32, the authors' value)."
        )
    if num_channels is not None and num_channels % num_groups != 0:
        raise ValueError(
            f"BatchChannelNorm2d: D2NORM.BCN.NUM_GROUPS={num_groups} does not divide the "
            f"{num_channels} channels of a layer. Fix: choose D2NORM.BCN.NUM_GROUPS dividing every "
            "normalized channel count (e.g. 32, 16 or 8 for widths that are multiples of 32)."
        )
    if not _is_number(eps) or not eps > 0:
        raise ValueError(
            f"D2NORM.BCN.EPS must be a number > 0, got {eps!r}. Fix: set D2NORM.BCN.EPS to 1e-5."
        )
    if mode not in BCN_MODES:
        raise ValueError(
            f"D2NORM.BCN.MODE must be one of {BCN_MODES}, got {mode!r}. Fix: set D2NORM.BCN.MODE "
            '"estimate" (micro-batch BCN: estimated statistics, default) or "batch" (large-batch '
            "BCN: batch statistics, reduced over all processes)."
        )
    if not _is_number(moving_speed) or not 0.0 < moving_speed <= 1.0:
        raise ValueError(
            f"D2NORM.BCN.MOVING_SPEED must be in (0, 1] (the update rate r of the estimates), got "
            f"{moving_speed!r}. Fix: set D2NORM.BCN.MOVING_SPEED to 0.1 (default)."
        )
    if schedule not in BCN_SCHEDULES:
        raise ValueError(
            f"D2NORM.BCN.MOVING_SPEED_SCHEDULE must be one of {BCN_SCHEDULES}, got {schedule!r}. "
            'Fix: set it to "cumulative" (r_t = max(r, 1/(t+1)), default) or "constant" (r_t = r).'
        )
    if affine not in BCN_AFFINES:
        raise ValueError(
            f"D2NORM.BCN.AFFINE must be one of {BCN_AFFINES}, got {affine!r}. Fix: set it to "
            '"group" (one γ, β per group: the authors\' code, default) or "channel" (per channel).'
        )


class BCNBatchNorm2d(nn.modules.batchnorm._NormBase):
    """The batch part of BCN for ``(N, C, H, W)`` inputs; see the module docstring.

    Parameters ``weight`` (γ_b), ``bias`` (β_b). Buffers (all in the state dict):
    ``running_mean`` (μ̂), ``running_var`` (σ̂²; in ``"batch"`` mode the unbiased running
    variance, as BN), ``num_batches_tracked`` (int64, t: training steps with data so far).
    A torch ``_NormBase`` (BN's parameters and buffers), so it counts as a norm layer (the
    optimizer's ``WEIGHT_DECAY_NORM``), while its forward is its own.
    """

    def __init__(self, num_features, mode="estimate", moving_speed=0.1, schedule="cumulative", eps=1e-5):
        check_bcn_options(1, eps, mode, moving_speed, schedule)
        super().__init__(int(num_features), eps=float(eps), momentum=float(moving_speed))
        self.mode, self.schedule = mode, schedule
        self.estimate = mode == "estimate"
        self.cumulative = schedule == "cumulative"
        self.moving_speed = float(moving_speed)

    def _check_input_dim(self, input):
        if input.dim() != 4:
            raise ValueError(f"BCNBatchNorm2d expects (N, C, H, W) input, got shape {list(input.shape)}")

    def eval_statistics(self):
        """The eval map in batch-norm form (:class:`~d2norm.layers.base.EvalStatistics`)."""
        return EvalStatistics(self.weight, self.bias, self.running_mean, self.running_var, self.eps)

    def extra_repr(self):
        return (
            f"{self.num_features}, mode={self.mode}, moving_speed={self.moving_speed}, "
            f"schedule={self.schedule}, eps={self.eps}"
        )

    def rate(self):
        """r_t for the next training step, a 0-dim float tensor (no host sync)."""
        t = self.num_batches_tracked.to(self.running_mean.dtype)
        if self.cumulative:
            return torch.clamp(torch.reciprocal(t + 1.0), min=self.moving_speed)
        return torch.full_like(t, self.moving_speed)

    def eval_scale_shift(self):
        """``(γ_b/√(σ̂² + ε), β_b − μ̂·γ_b/√(σ̂² + ε))``: the eval map as a per-channel affine (detached)."""
        scale = self.weight.detach() * torch.rsqrt(self.running_var + self.eps)
        return scale, self.bias.detach() - self.running_mean * scale

    def _apply_eval_map(self, x):
        """γ_b·(x − μ̂)/√(σ̂² + ε) + β_b, differentiable in x, γ_b, β_b (μ̂, σ̂² constants): torch's
        BN kernel in inference mode, whose backward is fused (several times faster on CPU than
        the gradient of a broadcast per-channel affine)."""
        return torch.batch_norm(
            x,
            self.weight,
            self.bias,
            self.running_mean,
            self.running_var,
            False,
            0.0,
            self.eps,
            torch.backends.cudnn.enabled,
        )

    def _update(self, mean_b, var_b, n):
        """Move the estimates toward the step's statistics (biased variance ``var_b`` over ``n``
        values per channel); nothing moves when n == 0."""
        r = self.rate() * (n > 0).to(self.running_mean.dtype)
        if self.estimate:  # σ̇² around the estimate before its update (Algorithm 1, line 2)
            target_var = var_b + (mean_b - self.running_mean).square()
        else:  # BN's running variance: unbiased
            target_var = var_b * n / (n - 1.0).clamp(min=1.0)
        self.running_mean.lerp_(mean_b, r)
        self.running_var.lerp_(target_var, r)
        self.num_batches_tracked.add_((n > 0).to(torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"BCNBatchNorm2d expects (N, C, H, W) input, got shape {list(x.shape)}")
        if not self.training:
            return self._apply_eval_map(x)
        if not torch.jit.is_scripting():
            if distributed_world_size() > 1:
                return self._forward_processes(x)
        if x.numel() == 0:  # empty batch: an empty output connected to γ_b, β_b; no update
            return x * self.weight.view(1, -1, 1, 1).to(x.dtype) + self.bias.view(1, -1, 1, 1).to(x.dtype)
        dtype = self.running_mean.dtype
        with torch.no_grad():
            # per-channel mean and biased variance in one fused pass
            mean_b, var_b = torch.batch_norm_update_stats(x.detach(), None, None, 0.0)
            n = torch.full((), float(x.numel() // x.shape[1]), dtype=dtype, device=x.device)
            self._update(mean_b.to(dtype), var_b.to(dtype), n)
        if self.estimate:
            return self._apply_eval_map(x)
        return torch.batch_norm(
            x, self.weight, self.bias, None, None, True, 0.0, self.eps, torch.backends.cudnn.enabled
        )

    @torch.jit.unused
    def _forward_processes(self, x):
        """Training forward with several processes: the statistics of the whole batch (every
        rank takes part, an empty batch included)."""
        dtype = self.running_mean.dtype
        xf = x.float()
        mean_g, var_g, n = global_batch_stats(xf if not self.estimate else xf.detach())
        with torch.no_grad():
            self._update(mean_g.detach().to(dtype), var_g.detach().to(dtype), n.to(dtype))
        if self.estimate:
            return self._apply_eval_map(x)
        scale = self.weight.float() * torch.rsqrt(var_g + self.eps)
        shift = self.bias.float() - mean_g * scale
        return torch.addcmul(shift.view(1, -1, 1, 1), xf, scale.view(1, -1, 1, 1)).to(x.dtype)


class BatchChannelNorm2d(nn.Module):
    """Batch-Channel Normalization for ``(N, C, H, W)`` inputs (``NORM: "BCN"``); see the module
    docstring.

    Args:
        num_channels: C.
        num_groups: G of the channel part (``D2NORM.BCN.NUM_GROUPS``), dividing C.
        eps: ε of both parts (``D2NORM.BCN.EPS``).
        mode: ``"estimate"`` or ``"batch"`` (``D2NORM.BCN.MODE``).
        moving_speed: r in (0, 1] (``D2NORM.BCN.MOVING_SPEED``).
        schedule: ``"cumulative"`` or ``"constant"`` (``D2NORM.BCN.MOVING_SPEED_SCHEDULE``).
        affine: ``"group"`` or ``"channel"`` (``D2NORM.BCN.AFFINE``).

    ``bn``: the batch part (:class:`BCNBatchNorm2d`; a ``FrozenBatchNorm2d`` once frozen, an
    ``nn.Identity`` once folded into the conv). ``weight``, ``bias``: the channel part's affine
    (G or C values).
    """

    def __init__(
        self,
        num_channels,
        num_groups=32,
        eps=1e-5,
        mode="estimate",
        moving_speed=0.1,
        schedule="cumulative",
        affine="group",
    ):
        super().__init__()
        check_bcn_options(num_groups, eps, mode, moving_speed, schedule, affine, num_channels)
        self.num_channels, self.num_groups = int(num_channels), int(num_groups)
        self.eps, self.affine = float(eps), affine
        # the options under their keyword names (the norm table reads them back)
        self.mode, self.moving_speed, self.schedule = mode, float(moving_speed), schedule
        self.bn = BCNBatchNorm2d(
            num_channels, mode=mode, moving_speed=moving_speed, schedule=schedule, eps=eps
        )
        n = num_groups if affine == "group" else num_channels
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n))
        self.affine_repeat = num_channels // n  # channels sharing one γ, β

    @property
    def num_features(self):
        return self.num_channels

    def extra_repr(self):
        return f"{self.num_channels}, num_groups={self.num_groups}, eps={self.eps}, affine={self.affine}"

    @classmethod
    def type_probe(cls, num_groups, num_channels, **kwargs):
        """A layer of this class for fewer channels than groups, which refuses to run
        (detectron2 v0.6's ``RetinaNetHead`` builds ``get_norm(norm, 1)`` only to read the type;
        see :meth:`d2norm.layers.GroupNorm.type_probe`)."""
        check_bcn_options(num_groups, kwargs.get("eps", 1e-5), "estimate", 0.1, "constant")
        layer = cls(num_channels, num_channels, **kwargs)
        layer.unusable = (
            f"BatchChannelNorm2d: D2NORM.BCN.NUM_GROUPS={num_groups} groups cannot split the "
            f"{num_channels} channel(s) of this layer. Fix: choose D2NORM.BCN.NUM_GROUPS dividing "
            "every normalized channel count (e.g. 32, 16 or 8 for widths that are multiples of 32)."
        )
        layer.register_forward_pre_hook(refuse_unusable)
        return layer

    def channel_affine(self):
        """``(γ_c, β_c)`` expanded to one value per channel."""
        if self.affine_repeat == 1:
            return self.weight, self.bias
        return (
            self.weight.repeat_interleave(self.affine_repeat),
            self.bias.repeat_interleave(self.affine_repeat),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"BatchChannelNorm2d expects (N, C, H, W) input, got shape {list(x.shape)}")
        out = self.bn(x)
        weight, bias = self.channel_affine()
        if out.numel() == 0:  # empty batch: an empty output connected to every parameter
            return out * weight.view(1, -1, 1, 1).to(out.dtype) + bias.view(1, -1, 1, 1).to(out.dtype)
        return F.group_norm(out, self.num_groups, weight.to(out.dtype), bias.to(out.dtype), self.eps)


class BatchChannelNormWS(_StandardizesPrecedingConv, BatchChannelNorm2d):
    """BCN whose preceding conv is weight-standardized (``NORM: "BCN+WS"``), the paper's pairing;
    WS exactly as ``"GN+WS"`` (:class:`d2norm.layers.GroupNormWS`, ``D2NORM.WS.*``)."""

    def __init__(self, num_channels, num_groups=32, ws_eps=1e-5, ws_convention="sqrt_var", **kwargs):
        check_ws_options(ws_eps, ws_convention)
        super().__init__(num_channels, num_groups, **kwargs)
        self.ws_eps = ws_eps
        self.ws_convention = ws_convention
