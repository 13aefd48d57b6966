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
layer keeps a host mirror of the counter (advanced with the buffer, re-read once only when
something else wrote the buffer: a checkpoint load, ``fill_``, the trainer's restore; its version
counter tells), so forward and backward synchronize nothing. The counter advances once per
training forward (in detectron2 every norm runs once per step). Few kernels per step: the renorm
factor is folded into the normalizer (``gamma r z = gamma x / sqrt(d)`` with
``d = (sigma2 + eps) / r^2 = clamp(running_var + eps, (sigma2 + eps)/25, 25 (sigma2 + eps))``),
so the forward is one inference-mode batch norm, and one inference-mode batch-norm backward gives
the input-gradient term, ``dgamma`` and ``dbeta`` together (15 ATen kernel ops per step in the
steady state, forward and backward, against the official formulation's 37:
``benchmarks/kernels.py``). Under AMP
(autocast) the statistics, buffers and parameter gradients stay in the module's dtype (float32)
and reductions accumulate in float32; the output and the input gradient have the input's dtype.

Under a gradient scaler (``torch.amp.GradScaler``) the backward receives ``S * dL/dy``. Before
the forward, :func:`set_grad_scale` gives each layer the current scale ``S`` (d2norm's trainer
does this every AMP step); the backward then stores ``psi / S`` (unscaled) and uses
``S * mean(buffer_gz)``, so a change of scale never mixes scales inside the ring. A ``psi`` that
overflowed (inf/NaN, which makes the scaler skip the step) is never stored: that channel keeps its
previous entry, so one overflow does not poison later steps. Without a scaler psi is stored as
computed (a non-finite psi comes with non-finite weight gradients: that step is lost anyway).

The conv before each MABN must use centralized weights (``W - mean(W)`` per output channel);
:meth:`MovingAverageBatchNorm2d.prepare_preceding_conv` installs that parametrization.
"""

import math

import torch
from torch import nn

from .base import ConvFedNorm, EvalStatistics
from .weight_transforms import WeightCentralization, release_transformed_weight

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
    """y = gamma * x / sqrt(d) + beta with d = (sigma2 + eps) / r^2, and the MABN backward.

    The module computes the statistics without autograd and passes them in ``st`` (a dict of
    small tensors and Python values): ``d`` and the ``eps`` to add to it (r = 1: d = sigma2,
    eps = the layer's; renorm on: d = clamp(running_var + eps, (sigma2 + eps)/25, 25 (sigma2 + eps)),
    eps = 0, the same as (sigma2 + eps) / clamp(r, 1/5, 5)^2), ``var_eps`` = sigma2 + eps (or
    ``var_eps_25`` = (sigma2 + eps)/25), the ring slot and whether the moving average is on. The
    forward is one inference-mode batch norm. The backward is one inference-mode batch-norm
    backward, which gives ``g / sqrt(sigma2 + eps)`` (g = dy gamma r), ``dgamma = sum(dy r z)`` and
    ``dbeta = sum(dy)`` at once; then psi = gamma dgamma / M goes into ``st["buffer_gz"]`` (the
    module buffer, in place) and ``dx = g / sqrt(sigma2 + eps) - x psi_bar / (sigma2 + eps)``.
    Only ``x`` goes through ``save_for_backward``; the per-channel tensors are fresh, never-mutated,
    grad-free intermediates and ride on ``ctx`` (the ring buffer must, since it is mutated in
    backward).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, st):
        y = torch.batch_norm(x, weight, bias, st["zeros"], st["d"], False, 0.0, st["d_eps"], False)
        ctx.save_for_backward(x, weight)
        ctx.st = st
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        st = ctx.st
        buffer_gz = st["buffer_gz"]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if grad_out.dtype != x.dtype:
            grad_out = grad_out.to(x.dtype)
        # grad_in = dy * gamma / sqrt(d) = g / sqrt(sigma2 + eps); dgamma = sum(dy x / sqrt(d))
        # = sum(dy r z); dbeta = sum(dy). The weight gradient feeds psi, so it is always computed.
        grad_in, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
            grad_out,
            x,
            weight.to(st["zeros"].dtype),
            st["zeros"],
            st["d"],
            None,
            None,
            False,
            st["d_eps"],
            [need_x, True, need_b],
        )
        # psi = E[g z] = gamma r E[dy z] = gamma * dgamma / M
        psi = torch.addcmul(st["zeros"], weight, grad_w, value=st["inv_num"])
        # Under a loss scale S (AMP) the ring holds unscaled, finite values: S is divided out, and
        # a channel whose psi overflowed keeps its previous entry (the scaler skips that step).
        # Unscaled, psi is stored as is (a non-finite one comes with non-finite weight gradients).
        scale = st["grad_scale"]
        row = buffer_gz[st["slot"]]
        if scale is None:
            row.copy_(psi)
        else:
            psi_u = psi / scale
            torch.where(psi_u.abs() < math.inf, psi_u, row, out=row)
        if st["use_sma"]:
            psi_bar = buffer_gz.mean(dim=0)
            if scale is not None:
                psi_bar = psi_bar * scale
        else:
            psi_bar = psi
        grad_x = None
        if need_x:
            # dx = g / sqrt(sigma2 + eps) - x * psi_bar / (sigma2 + eps)
            coef = torch.div(psi_bar, st["var_eps"]).view(1, -1, 1, 1)
            grad_x = grad_in.addcmul_(x, coef, value=-st["var_eps_factor"])
            if grad_x.dtype != x.dtype:
                grad_x = grad_x.to(x.dtype)
        return grad_x, grad_w if need_w else None, grad_b if need_b else None, None


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
        self._mirror_iters()

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
            zeros = self._constants(x.device, 1)[0]
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

        release_transformed_weight(x)  # the centralized conv's weight is rebuilt in backward
        with torch.no_grad():
            num = x.numel() // x.shape[1]
            zeros, ones, inv_num, eps_25, inv_b = self._constants(x.device, num)
            # iteration bookkeeping on the host (t = iters after the increment): no device reads
            t = self._host_iters() + 1
            self.iters.add_(1)
            self._t = t
            self._mirror_iters()
            slot = t % self.buffer_size
            # (t > B) and (t >= warmup)  <=>  t >= max(B + 1, warmup)
            use_sma = t >= max(self.buffer_size + 1, self.warmup_iters)
            renorm_on = t > max(_RENORM_MIN_ITERS, self.warmup_iters)

            chi, _ = _channel_dot(x, x, zeros, ones, inv_num, False)  # E[x^2], one pass
            self.buffer_x2[slot].copy_(chi)
            st = {"zeros": zeros, "slot": slot, "use_sma": use_sma, "buffer_gz": self.buffer_gz}
            st.update(inv_num=1.0 / num, grad_scale=self.grad_scale)
            if renorm_on:
                # r^2 = clamp((sigma2 + eps) / (running_var + eps), 1/25, 25) (running_var before
                # this step's update) folded into the normalizer: d = (sigma2 + eps) / r^2
                buf_t = self.buffer_x2.t()
                if use_sma:  # (sigma2 + eps) / 25 and 25 (sigma2 + eps), each in one op
                    lo = torch.addmv(eps_25, buf_t, inv_b, alpha=1.0 / 25.0)
                    hi = torch.addmv(eps_25, buf_t, inv_b, beta=625.0, alpha=25.0)
                else:
                    lo = torch.add(chi, self.eps).mul_(1.0 / 25.0)
                    hi = lo * 625.0
                st.update(d=torch.clamp(self.running_var + self.eps, lo, hi), d_eps=0.0)
                st.update(var_eps=lo, var_eps_factor=1.0 / 25.0)
                if use_sma:  # running_var <- momentum running_var + (1 - momentum) mean(buffer_x2)
                    self.running_var.addmv_(buf_t, inv_b, beta=self.momentum, alpha=1.0 - self.momentum)
                else:
                    self.running_var.lerp_(chi, 1.0 - self.momentum)
            else:
                var = self.buffer_x2.mean(dim=0) if use_sma else chi
                st.update(d=var, d_eps=self.eps, var_eps=var + self.eps, var_eps_factor=1.0)
                self.running_var.lerp_(var, 1.0 - self.momentum)
        return _MABNFunction.apply(x, self.weight, self.bias, st)

    def _mirror_iters(self):
        """Record that the host mirror ``_t`` equals the ``iters`` buffer as it is now."""
        it = self.iters
        if "_t" not in self.__dict__:
            self._t = 0  # a new layer: iters is 0
        self.__dict__["_seen"] = it
        self._seen_version = it._version

    def _apply(self, fn, *args, **kwargs):
        # .to() / .cuda() / .double() copy the buffer: the mirror stays valid if it was
        it = self.iters
        in_sync = self.__dict__.get("_seen") is it and self.__dict__.get("_seen_version") == it._version
        out = super()._apply(fn, *args, **kwargs)
        if in_sync:
            self._mirror_iters()
        return out

    def _host_iters(self):
        """The iteration count, mirrored on the host. Re-read from the buffer (one host read) only
        when something else wrote it since this layer last did (a checkpoint load, ``.to()``,
        ``fill_``, a restore by the trainer's non-finite guard): its version counter tells."""
        it = self.iters
        if self.__dict__.get("_seen") is not it or self.__dict__.get("_seen_version") != it._version:
            self._t = int(it.item())
            self._mirror_iters()
        return self._t

    def _constants(self, device, num):
        """Per-channel zeros / ones / 1/num / eps/25 and the ring's 1/B vector in the statistics
        dtype, cached per device and batch size (not state; never written)."""
        dtype = self.running_var.dtype
        key = (device, dtype, num, self.eps)
        cached = self.__dict__.get("_const_cache")
        if cached is None or cached[0] != key:
            c = self.num_features
            cached = (
                key,
                torch.zeros(c, dtype=dtype, device=device),
                torch.ones(c, dtype=dtype, device=device),
                torch.full((c,), 1.0 / num, dtype=dtype, device=device),
                torch.full((c,), self.eps / 25.0, dtype=dtype, device=device),
                torch.full((self.buffer_size,), 1.0 / self.buffer_size, dtype=dtype, device=device),
            )
            self.__dict__["_const_cache"] = cached
        return cached[1:]


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
