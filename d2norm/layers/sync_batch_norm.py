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
from torch.nn import functional as F

__all__ = ["SyncBatchNorm2d", "all_reduce_sum"]


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


class SyncBatchNorm2d(nn.BatchNorm2d):
    """Synchronized BatchNorm2d (``NORM: "SyncBN"``); see the module docstring."""

    def forward(self, x):
        if x.dim() != 4:
            raise ValueError(f"SyncBatchNorm2d expects a 4D (N,C,H,W) input, got shape {tuple(x.shape)}")
        if not self.training:
            return super().forward(x)
        world = distributed_world_size()
        if world == 1:
            if x.numel() == 0:
                # nn.BatchNorm2d fails on an empty batch; keep the graph, leave the stats alone.
                return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1) * 0
            return super().forward(x)

        C = x.shape[1]
        xf = x.float()
        count = torch.full((1,), float(x.numel() // C), device=x.device, dtype=torch.float32)
        if x.numel() > 0:
            local_sum = xf.sum(dim=(0, 2, 3))
            local_sqsum = (xf * xf).sum(dim=(0, 2, 3))
        else:
            # zero contribution, still connected to x so backward reaches every rank's input
            local_sum = xf.sum(dim=(0, 2, 3)) + 0.0
            local_sqsum = local_sum
        stats = all_reduce_sum(torch.cat([local_sum, local_sqsum, count]))
        total = stats[-1].clamp(min=1.0)
        mean = stats[:C] / total
        var = (stats[C : 2 * C] / total - mean * mean).clamp(min=0.0)

        if self.track_running_stats and stats[-1].item() > 1:
            with torch.no_grad():
                n = stats[-1]
                unbiased = var.detach() * n / (n - 1)
                m = self.momentum if self.momentum is not None else 0.1
                self.running_mean.mul_(1 - m).add_(mean.detach().to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
                self.num_batches_tracked += 1
        inv_std = torch.rsqrt(var + self.eps)
        scale = self.weight.float() * inv_std
        shift = self.bias.float() - mean * scale
        return (xf * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)).to(x.dtype)
