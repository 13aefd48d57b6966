"""Cross-Iteration BN computed from its definition, the way the official code does it.

mu(W) = E[conv(x, W)], nu(W) = E[conv(x, W)^2] are evaluated through ``F.conv2d`` and their
gradients w.r.t. the conv weight at the stored iteration come from two
``torch.autograd.grad(..., retain_graph=True)`` calls. The history lives in Python lists. Every
other rule follows the paper and d2norm's documented choices (the clamp nubar = max(nu, mu^2),
sigma2bar = mean(nubar) - mubar^2, sqrt(sigma2bar + eps), burn-in = plain BN with history recorded
during its last k-1 iterations, running stats tracking the window statistics with the factor
nM/(nM-1)). Dtype-agnostic: the tests run it in float64, the benchmark in float32.
"""

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ReferenceConvCBN"]


class ReferenceConvCBN(nn.Module):
    """conv (no bias) + CBN; ``forward(x)`` runs both. ``conv.weight`` may be parametrized."""

    def __init__(
        self, conv, buffer_size=3, burnin=0, eps=1e-5, momentum=0.1, grad_through_compensation=False
    ):
        super().__init__()
        assert conv.bias is None
        c = conv.out_channels
        self.conv = conv
        self.buffer_size, self.burnin, self.eps, self.momentum = buffer_size, burnin, eps, momentum
        w = conv.weight
        self.weight = nn.Parameter(torch.ones(c, dtype=w.dtype, device=w.device))
        self.bias = nn.Parameter(torch.zeros(c, dtype=w.dtype, device=w.device))
        self.register_buffer("running_mean", torch.zeros(c, dtype=w.dtype, device=w.device))
        self.register_buffer("running_var", torch.ones(c, dtype=w.dtype, device=w.device))
        # False (the paper / official code): W_t in the compensation is a constant; True: the
        # compensated entries are differentiated w.r.t. W_t as well
        self.grad_through_compensation = grad_through_compensation
        self.iteration = 0
        self.history = []  # newest first: (mu, nu, dmu/dW, dnu/dW, W)

    def forward(self, x):
        conv = self.conv
        w = conv.weight  # one access: the tensor the graph is built from
        y = F.conv2d(x, w, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        shape = (1, -1, 1, 1)
        if not self.training:
            return (y - self.running_mean.view(shape)) / torch.sqrt(
                self.running_var.view(shape) + self.eps
            ) * self.weight.view(shape) + self.bias.view(shape)
        t, k = self.iteration, self.buffer_size
        m = y.shape[0] * y.shape[2] * y.shape[3]
        mu = y.mean(dim=(0, 2, 3))
        nu = (y * y).mean(dim=(0, 2, 3))
        record = k > 1 and t >= self.burnin - (k - 1)
        if record:
            ones = torch.ones_like(mu)
            dmu = torch.autograd.grad(mu, w, ones, retain_graph=True)[0]
            dnu = torch.autograd.grad(nu, w, ones, retain_graph=True)[0]
        if t >= self.burnin and self.history:
            w_t = w if self.grad_through_compensation else w.detach()
            mus, nus = [mu], [nu]
            for mu_o, nu_o, dmu_o, dnu_o, w_o in self.history:
                dw = w_t - w_o
                mus.append(mu_o + (dmu_o * dw).sum(dim=(1, 2, 3)))
                nus.append(nu_o + (dnu_o * dw).sum(dim=(1, 2, 3)))
            mus, nus = torch.stack(mus), torch.stack(nus)
            nus = torch.max(nus, mus * mus)
            mean = mus.mean(0)
            var = nus.mean(0) - mean * mean
            n = len(mus)
        else:
            var, mean = torch.var_mean(y, dim=(0, 2, 3), unbiased=False)
            n = 1
        out = (y - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        out = out * self.weight.view(shape) + self.bias.view(shape)
        with torch.no_grad():
            a = self.momentum
            self.running_mean.mul_(1 - a).add_(a * mean)
            self.running_var.mul_(1 - a).add_(a * var * (n * m) / (n * m - 1))
        if record:
            self.history.insert(0, (mu.detach(), nu.detach(), dmu, dnu, w.detach().clone()))
            del self.history[k - 1 :]
        self.iteration = t + 1
        return out
