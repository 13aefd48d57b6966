"""Moving Average Batch Normalization (MABN; Yan et al., ICLR 2020), pure torch.

Per channel, with ``M = N*H*W`` and ring buffers of ``B = buffer_size`` entries:

Training forward (iteration ``t``; see "Iteration convention" below)::

    chi   = E[x^2]                       # over (N, H, W); no mean subtraction
    buffer_x2[t % B] = chi
    sigma2 = chi                         if t <= B or t < warmup_iters
           = mean(buffer_x2)             otherwise (simple moving average of the last B chi)
    z     = x / sqrt(sigma2 + eps)
    r     = 1                            if t <= max(1000, warmup_iters)
          = clamp(sqrt(sigma2 + eps) / sqrt(running_var + eps), 1/5, 5)   otherwise
            (running_var *before* this step's update)
    y     = gamma * r * z + beta
    running_var = momentum * running_var + (1 - momentum) * sigma2

Training backward (a custom autograd Function; uses the ``t`` of its forward)::

    g     = dL/dy * gamma * r
    psi   = E[g * z]
    buffer_gz[t % B] = psi
    psi_bar = psi                        if t <= B or t < warmup_iters
            = mean(buffer_gz)            otherwise
    dL/dx = (g - z * psi_bar) / sqrt(sigma2 + eps)
    dL/dgamma = sum(dL/dy * r * z),  dL/dbeta = sum(dL/dy)

Eval: ``y = gamma * x / sqrt(running_var + eps) + beta`` (an affine map).

Iteration convention (identical to the official ``MABN2d``): the counter ``iters`` starts at
0 and is incremented *before* the statistics are computed, so the first training forward is
``t = 1`` and writes ring-buffer slot ``1 % B``. A forward at ``t`` uses the buffer average
from ``t = max(B + 1, warmup_iters)`` on; the renorm clamp is active from
``t = max(1000, warmup_iters) + 1`` on. The backward of the forward at ``t`` writes
``buffer_gz[t % B]`` and uses the same condition on ``t``. Note ``momentum`` follows the paper
(weight of the *old* value, default 0.98), the opposite of ``nn.BatchNorm2d``'s convention.

Unlike the official code, no iteration-dependent decision reads a tensor on the host: the
counter is a tensor buffer and every choice is a tensor op (``torch.where``, ``index_copy_``
with a tensor index), so there is no host-device synchronization in forward or backward and
the layer is CUDA-graph friendly. The counter advances once per training forward (in
detectron2 every norm runs once per step). Under AMP (autocast) the statistics, buffers and
parameter gradients stay in the module's dtype (float32) and reductions accumulate in float32;
the output and the input gradient have the input's dtype.

Under a gradient scaler (``torch.amp.GradScaler``) the backward receives ``S * dL/dy``. Before
the forward, :func:`set_grad_scale` gives each layer the current scale ``S`` (d2norm's trainer
does this every AMP step); the backward then stores ``psi / S`` (unscaled) and uses
``S * mean(buffer_gz)``, so a change of scale never mixes scales inside the ring. A ``psi`` that
overflowed (inf/NaN, which makes the scaler skip the step) is never stored: that channel keeps its
previous entry, so one overflow does not poison later steps.

The conv before each MABN must use centralized weights (``W - mean(W)`` per output channel);
:meth:`MovingAverageBatchNorm2d.prepare_preceding_conv` installs that parametrization.
"""

import torch
from torch import nn

from .base import ConvFedNorm, EvalStatistics
from .weight_transforms import WeightCentralization

__all__ = ["MovingAverageBatchNorm2d", "set_grad_scale"]

_RENORM_MIN_ITERS = 1000
_R_MIN, _R_MAX = 1.0 / 5.0, 5.0


def _channel_dot(grad: torch.Tensor, x: torch.Tensor, zeros, ones, invstd, need_sum_grad: bool):
    """Per-channel ``sum(grad * x * invstd)`` (and ``sum(grad)``) over (N, H, W), in one pass.

    Uses the reduction half of the native batch-norm backward (``grad_input`` masked off; mean
    0, the given ``invstd``): a single fused kernel without a full-size temporary on CPU and
    CUDA, accumulating in float32 for half inputs and returning results in the dtype of
    ``ones`` (the statistics dtype). ``(grad * x).sum(...)`` needs a full-size temporary and,
    on CPU, about 1.6x the time.
    """
    _, dot, sum_grad = torch.ops.aten.native_batch_norm_backward(
        grad, x, ones, None, None, zeros, invstd, True, 0.0, [False, True, need_sum_grad]
    )
    return dot, sum_grad


class _MABNFunction(torch.autograd.Function):
    """y = gamma * r * (x * inv_std) + beta, with the MABN backward.

    The forward statistics are computed by the module without autograd and passed in ``st``
    (a dict of small tensors and constants); this Function applies them and implements the
    moving-average backward, writing ``st["buffer_gz"]`` (the module buffer, in place) at slot
    ``st["idx"]``. Only ``x`` goes through ``save_for_backward``; the per-channel tensors are
    fresh, never-mutated, grad-free intermediates and ride on ``ctx`` (the ring buffer must,
    since it is mutated in backward).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, st):
        gr = weight * st["r"]  # gamma * r
        # y = x * gr / sqrt(var + eps) + beta as an inference-mode batch norm with mean 0: one
        # fused pass, about 2x faster than a broadcast addcmul on CPU.
        y = torch.batch_norm(x, gr, bias, st["zeros"], st["var"], False, 0.0, st["eps"], False)
        ctx.save_for_backward(x)
        ctx.st = st
        ctx.gr = gr
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        st, gr = ctx.st, ctx.gr
        inv_std, buffer_gz = st["inv_std"], st["buffer_gz"]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if grad_out.dtype != x.dtype:
            grad_out = grad_out.to(x.dtype)

        # With g = dy * gamma * r and z = x * inv_std:
        #   psi = E[g z] = gamma r E[dy z],  dgamma = r sum(dy z),  dbeta = sum(dy),
        #   dx = (g - z psi_bar) inv_std = dy (gamma r inv_std) - x (psi_bar inv_std^2).
        sum_dy_z, sum_dy = _channel_dot(grad_out, x, st["zeros"], st["ones"], inv_std, need_b)
        psi = torch.mul(gr, sum_dy_z).mul_(st["inv_num"])
        # The ring holds unscaled, finite values: a loss scale S (AMP) is divided out, and a
        # channel whose psi overflowed keeps its previous entry (the scaler skips that step).
        scale = st["grad_scale"]
        psi_u = psi if scale is None else psi / scale
        idx = st["idx"]
        buffer_gz.index_copy_(
            0, idx, torch.where(torch.isfinite(psi_u), psi_u.unsqueeze(0), buffer_gz.index_select(0, idx))
        )
        psi_mean = buffer_gz.mean(dim=0)
        psi_bar = torch.where(st["use_sma"], psi_mean if scale is None else psi_mean * scale, psi)

        grad_x = grad_w = None
        if need_x:
            grad_x = torch.mul(grad_out, (gr * inv_std).view(1, -1, 1, 1))
            grad_x.addcmul_(x, (psi_bar * st["inv_var"]).view(1, -1, 1, 1), value=-1.0)
            if grad_x.dtype != x.dtype:
                grad_x = grad_x.to(x.dtype)
        if need_w:
            grad_w = st["r"] * sum_dy_z
        return grad_x, grad_w, sum_dy if need_b else None, None


class MovingAverageBatchNorm2d(ConvFedNorm, nn.Module):
    """MABN for ``(N, C, H, W)`` inputs; see the module docstring for the exact algorithm.

    Args:
        num_features: C.
        buffer_size: B, the number of iterations averaged (the official ``real_B // B``).
            Config key ``D2NORM.MABN.BUFFER_SIZE``.
        warmup_iters: iterations during which the current batch statistics are used
            (config key ``D2NORM.MABN.WARMUP_ITERS``).
        momentum: running_var <- momentum * running_var + (1 - momentum) * sigma2, in [0, 1)
            (config key ``D2NORM.MABN.MOMENTUM``).
        eps: added to the variance.

    Buffers (all in the state_dict): ``iters`` (int64 scalar, training forwards so far),
    ``buffer_x2`` and ``buffer_gz`` (``(B, C)`` ring buffers of E[x^2] and E[g*z]),
    ``running_var`` (``(C,)``).
    """

    conv_requirement = "weight centralization of the conv before it"
    conv_without_bias = True  # MABN normalizes without subtracting a mean

    def __init__(self, num_features, buffer_size, warmup_iters=100, momentum=0.98, eps=1e-5):
        super().__init__()
        if isinstance(buffer_size, bool) or not isinstance(buffer_size, int) or buffer_size < 1:
            raise ValueError(
                f"MovingAverageBatchNorm2d: buffer_size must be an integer >= 1, got "
                f"{buffer_size!r}. Set D2NORM.MABN.BUFFER_SIZE to the number of iterations to "
                f"average (the simulated batch divided by the per-GPU batch, e.g. 32 // 2 = 16)."
            )
        if isinstance(warmup_iters, bool) or not isinstance(warmup_iters, int) or warmup_iters < 0:
            raise ValueError(
                f"MovingAverageBatchNorm2d: warmup_iters must be an integer >= 0, got "
                f"{warmup_iters!r}. Set D2NORM.MABN.WARMUP_ITERS to a non-negative iteration "
                f"count (default 100)."
            )
        if (
            isinstance(momentum, bool)
            or not isinstance(momentum, (int, float))
            or not (0.0 <= momentum < 1.0)
        ):
            raise ValueError(
                f"MovingAverageBatchNorm2d: momentum must be in [0, 1), got {momentum!r}. Set "
                f"D2NORM.MABN.MOMENTUM to the weight of the old running_var (paper/default 0.98; "
                f"note this is 1 - the nn.BatchNorm2d momentum)."
            )
        if not eps > 0:
            raise ValueError(f"MovingAverageBatchNorm2d: eps must be > 0, got {eps!r}")
        self.num_features = int(num_features)
        self.buffer_size = buffer_size
        self.warmup_iters = warmup_iters
        self.momentum = float(momentum)
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("iters", torch.zeros((), dtype=torch.int64))
        self.register_buffer("buffer_x2", torch.zeros(buffer_size, num_features))
        self.register_buffer("buffer_gz", torch.zeros(buffer_size, num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        #: The loss scale of the coming backward (a tensor or float; None: unscaled). Set by
        #: :func:`set_grad_scale`; not state.
        self.grad_scale = None

    def extra_repr(self):
        return (
            f"{self.num_features}, buffer_size={self.buffer_size}, "
            f"warmup_iters={self.warmup_iters}, momentum={self.momentum}, eps={self.eps}"
        )

    def conv_transform(self):
        """The parametrization this norm puts on the weight of the conv that feeds it."""
        return WeightCentralization()

    def eval_statistics(self):
        """The eval map γ·x/√(running_var + ε) + β (no mean; see :mod:`d2norm.layers.base`)."""
        return EvalStatistics(self.weight, self.bias, None, self.running_var, self.eps)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Accept the official MABN2d layout: running_var (1, C, 1, 1), iters (1,).
        for name, buf in (("running_var", self.running_var), ("iters", self.iters)):
            t = state_dict.get(prefix + name)
            if isinstance(t, torch.Tensor) and t.shape != buf.shape and t.numel() == buf.numel():
                state_dict[prefix + name] = t.reshape(buf.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(
                f"MovingAverageBatchNorm2d expects (N, C, H, W) input, got shape {tuple(x.shape)}"
            )
        if x.numel() == 0:
            # Empty batch: an empty output that is still connected to gamma/beta; no state update.
            return x * self.weight.view(1, -1, 1, 1).to(x.dtype) + self.bias.view(1, -1, 1, 1).to(x.dtype)

        if not self.training:
            # y = gamma * x / sqrt(running_var + eps) + beta: an inference batch norm with mean 0
            zeros, _ = self._constants(x.device)
            return torch.batch_norm(
                x,
                self.weight,
                self.bias,
                zeros,
                self.running_var,
                False,
                0.0,
                self.eps,
                torch.backends.cudnn.enabled,
            )

        with torch.no_grad():
            zeros, ones = self._constants(x.device)
            num = x.numel() // x.shape[1]
            # iteration bookkeeping, all on the device: t = iters after the increment
            t = self.iters.add_(1)
            idx = torch.remainder(t, self.buffer_size).view(1)
            # (t > B) and (t >= warmup)  <=>  t >= max(B + 1, warmup)
            use_sma = t >= max(self.buffer_size + 1, self.warmup_iters)
            renorm_on = t > max(_RENORM_MIN_ITERS, self.warmup_iters)

            chi, _ = _channel_dot(x, x, zeros, ones, ones, False)  # sum(x^2), one pass
            chi.mul_(1.0 / num)
            self.buffer_x2.index_copy_(0, idx, chi.unsqueeze(0))
            var = torch.where(use_sma, self.buffer_x2.mean(dim=0), chi)
            var_eps = var + self.eps
            inv_var = torch.reciprocal(var_eps)
            r = torch.where(
                renorm_on,
                torch.div(var_eps, self.running_var + self.eps).sqrt_().clamp_(_R_MIN, _R_MAX),
                1.0,
            )
            self.running_var.lerp_(var, 1.0 - self.momentum)
            st = {
                "var": var,
                "inv_std": inv_var.sqrt(),
                "inv_var": inv_var,
                "r": r,
                "zeros": zeros,
                "ones": ones,
                "idx": idx,
                "use_sma": use_sma,
                "buffer_gz": self.buffer_gz,
                "eps": self.eps,
                "inv_num": 1.0 / num,
                "grad_scale": self.grad_scale,
            }
        return _MABNFunction.apply(x, self.weight, self.bias, st)

    def _constants(self, device):
        """Per-channel zeros / ones in the statistics dtype, cached per device (not state)."""
        dtype = self.running_var.dtype
        key = (device, dtype)
        cached = self.__dict__.get("_const_cache")
        if cached is None or cached[0] != key:
            cached = (
                key,
                torch.zeros(self.num_features, dtype=dtype, device=device),
                torch.ones(self.num_features, dtype=dtype, device=device),
            )
            self.__dict__["_const_cache"] = cached
        return cached[1], cached[2]


def set_grad_scale(model, scale):
    """Tell every MABN layer of ``model`` the loss scale of the coming backward.

    ``scale``: the gradient scaler's current scale as a tensor (``scaler.scale(torch.ones(()))``,
    no host synchronization) or a float; None for an unscaled backward. Returns the number of
    layers set."""
    n = 0
    for m in model.modules():
        if isinstance(m, MovingAverageBatchNorm2d):
            m.grad_scale = scale
            n += 1
    return n
