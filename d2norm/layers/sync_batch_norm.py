"""SyncBN: BatchNorm whose batch statistics are averaged over all processes.

Per channel, with n_r the number of values (N·H·W) on rank r:
    μ = Σ_r n_r·mean_r / Σ_r n_r,   σ² = Σ_r n_r·E_r[x²] / Σ_r n_r − μ²,
    y = γ·(x − μ)/√(σ² + ε) + β.
Weighting by n_r makes ranks with different (or zero) batch sizes correct, and every rank takes
part in the all-reduce even with an empty batch, so nothing hangs. In a single process, or when
no process group is initialized, it is exactly ``nn.BatchNorm2d``.
"""

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["SyncBatchNorm2d", "all_reduce_sum", "global_batch_stats"]


class _DifferentiableAllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor):
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def distributed_world_size():
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


def all_reduce_sum(tensor):
    """Sum ``tensor`` over all processes; differentiable (the gradient is all-reduced too)."""
    if distributed_world_size() == 1:
        return tensor
    return _DifferentiableAllReduceSum.apply(tensor)


def global_batch_stats(x):
    """``(mean, var, n)``: per channel (dim 1) mean and biased variance of ``x`` over every dim
    but C and over all processes (the equations above), and the global count n (a 0-dim
    tensor). Differentiable; every rank must call it, an empty batch included (it adds zeros,
    still connected to ``x`` so backward reaches every rank's input)."""
    C = x.shape[1]
    dims = [0] + list(range(2, x.dim()))
    count = torch.full((1,), float(x.numel() // max(C, 1)), device=x.device, dtype=x.dtype)
    stats = all_reduce_sum(torch.cat([x.sum(dim=dims), (x * x).sum(dim=dims), count]))
    total = stats[-1].clamp(min=1.0)
    mean = stats[:C] / total
    var = (stats[C : 2 * C] / total - mean * mean).clamp(min=0.0)
    return mean, var, stats[-1]


class SyncBatchNorm2d(nn.BatchNorm2d):
    """Synchronized BatchNorm2d (``NORM: "SyncBN"``); see the module docstring.

    Like ``nn.SyncBatchNorm`` (what detectron2's "SyncBN" builds) it accepts any input with a
    channel dim, ``(N, C, *)``; statistics are over every dim but C. The running statistics are
    updated without reading the all-reduced count on the host (no device synchronization per
    layer): the update is weighted by ``[n > 1]`` for the global count n, as torch's BN cannot
    update from a single value. ``momentum=None`` is torch's cumulative average
    (factor 1/num_batches_tracked)."""

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"SyncBatchNorm2d expects an (N, C, *) input, got shape {tuple(input.shape)}")

    def forward(self, x):
        self._check_input_dim(x)
        if not self.training:
            return super().forward(x)
        world = distributed_world_size()
        if world == 1:
            if x.numel() == 0:
                # nn.BatchNorm2d fails on an empty batch; keep the graph, leave the stats alone.
                return _affine(x, self.weight, self.bias)
            return super().forward(x)

        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        xf = x.float()
        mean, var, n = global_batch_stats(xf)

        if self.track_running_stats:
            with torch.no_grad():
                valid = (n > 1).to(n.dtype)  # 0 or 1, on the device: no host sync
                self.num_batches_tracked.add_(valid.to(self.num_batches_tracked.dtype))
                if self.momentum is None:  # cumulative average, as torch's BN
                    m = valid / self.num_batches_tracked.clamp(min=1).to(n.dtype)
                else:
                    m = valid * self.momentum
                unbiased = var.detach() * n / (n - 1).clamp(min=1.0)
                self.running_mean.add_((mean.detach() - self.running_mean) * m)
                self.running_var.add_((unbiased - self.running_var) * m)
        inv_std = torch.rsqrt(var + self.eps)
        scale = inv_std if self.weight is None else self.weight.float() * inv_std
        shift = -mean * scale if self.bias is None else self.bias.float() - mean * scale
        return (xf * scale.view(shape) + shift.view(shape)).to(x.dtype)


def _affine(x, weight, bias):
    """``x * weight + bias * 0`` per channel (dim 1): an output connected to the affine
    parameters (for an empty batch); the identity when the layer has none."""
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    out = x
    if weight is not None:
        out = out * weight.view(shape)
    if bias is not None:
        out = out + bias.view(shape) * 0
    return out
