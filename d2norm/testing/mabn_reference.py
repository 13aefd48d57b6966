"""Independent references for MABN, used by tests and benchmarks/mabn_speed.py.

* :class:`MABNReference` — a plain float64, step-by-step reimplementation of the MABN
  equations: Python ints for the iteration counter, Python ``if`` for every branch, an explicit
  loop over channels, explicit ring buffers. Slow on purpose; written for readability.
* :class:`OfficialStyleMABN2d` — the formulation of the official MABN code (a Python
  autograd.Function that reads the iteration counter with ``.item()`` and branches in Python),
  written out again here so the benchmark can compare against it and a test can check it
  agrees with d2norm's layer.

Iteration convention (the official one): the counter starts at 0 and is incremented before each
training forward, so the first step is t = 1 and writes ring-buffer slot t % B.
"""

import torch
from torch import nn

RENORM_MIN_ITERS = 1000


class MABNReference:
    """float64 MABN for one layer; call forward(x, gamma, beta) then backward(dy) each step."""

    def __init__(self, num_features, buffer_size, warmup_iters=100, momentum=0.98, eps=1e-5):
        self.C = num_features
        self.B = buffer_size
        self.warmup = warmup_iters
        self.momentum = momentum
        self.eps = eps
        self.iters = 0
        self.buffer_x2 = torch.zeros(buffer_size, num_features, dtype=torch.float64)
        self.buffer_gz = torch.zeros(buffer_size, num_features, dtype=torch.float64)
        self.running_var = torch.ones(num_features, dtype=torch.float64)
        self._cache = None

    def _use_moving_average(self, t):
        return not (t <= self.B or t < self.warmup)

    def _renorm_active(self, t):
        return t > max(RENORM_MIN_ITERS, self.warmup)

    def forward(self, x, gamma, beta):
        x = x.detach().to(torch.float64)
        gamma = gamma.detach().to(torch.float64)
        beta = beta.detach().to(torch.float64)
        self.iters += 1
        t = self.iters
        slot = t % self.B
        y = torch.empty_like(x)
        sigma2 = [0.0] * self.C
        r = [0.0] * self.C
        for c in range(self.C):
            xc = x[:, c]
            chi = float((xc * xc).mean())
            self.buffer_x2[slot, c] = chi
            if self._use_moving_average(t):
                s2 = float(self.buffer_x2[:, c].sum()) / self.B
            else:
                s2 = chi
            std = (s2 + self.eps) ** 0.5
            if self._renorm_active(t):
                rc = std / (float(self.running_var[c]) + self.eps) ** 0.5
                rc = min(max(rc, 1.0 / 5.0), 5.0)
            else:
                rc = 1.0
            zc = xc / std
            y[:, c] = float(gamma[c]) * rc * zc + float(beta[c])
            sigma2[c] = s2
            r[c] = rc
        for c in range(self.C):
            self.running_var[c] = self.momentum * self.running_var[c] + (1 - self.momentum) * sigma2[c]
        self._cache = dict(t=t, x=x, gamma=gamma, sigma2=sigma2, r=r)
        self.last_sigma2 = torch.tensor(sigma2, dtype=torch.float64)
        self.last_r = torch.tensor(r, dtype=torch.float64)
        self.last_used_moving_average = self._use_moving_average(t)
        return y

    def backward(self, dy):
        cache = self._cache
        t, x, gamma, sigma2, r = cache["t"], cache["x"], cache["gamma"], cache["sigma2"], cache["r"]
        dy = dy.detach().to(torch.float64)
        slot = t % self.B
        dx = torch.empty_like(x)
        dgamma = torch.zeros(self.C, dtype=torch.float64)
        dbeta = torch.zeros(self.C, dtype=torch.float64)
        for c in range(self.C):
            std = (sigma2[c] + self.eps) ** 0.5
            zc = x[:, c] / std
            gc = dy[:, c] * float(gamma[c]) * r[c]
            psi = float((gc * zc).mean())
            self.buffer_gz[slot, c] = psi
            if self._use_moving_average(t):
                psi_bar = float(self.buffer_gz[:, c].sum()) / self.B
            else:
                psi_bar = psi
            dx[:, c] = (gc - zc * psi_bar) / std
            dgamma[c] = float((dy[:, c] * r[c] * zc).sum())
            dbeta[c] = float(dy[:, c].sum())
        return dx, dgamma, dbeta

    def eval_forward(self, x, gamma, beta):
        x = x.detach().to(torch.float64)
        gamma, beta = gamma.detach(), beta.detach()
        y = torch.empty_like(x)
        for c in range(self.C):
            inv_std = (float(self.running_var[c]) + self.eps) ** -0.5
            y[:, c] = float(gamma[c]) * x[:, c] * inv_std + float(beta[c])
        return y


class _OfficialStyleFunction(torch.autograd.Function):
    """Official-style MABN: host reads of the counter and Python branches (syncs on GPU)."""

    @staticmethod
    def forward(
        ctx,
        x,
        weight,
        bias,
        running_var,
        buffer_x2,
        buffer_gz,
        iters,
        buffer_size,
        warmup_iters,
        momentum,
        eps,
    ):
        t = iters.item()  # host read, as in the official code
        C = x.size(1)
        x2 = (x * x).mean(dim=(0, 2, 3))
        buffer_x2[t % buffer_size].copy_(x2)
        if t <= buffer_size or t < warmup_iters:
            var = x2.view(1, C, 1, 1)
        else:
            var = buffer_x2.mean(dim=0).view(1, C, 1, 1)
        z = x / (var + eps).sqrt()
        r = (var + eps).sqrt() / (running_var.view(1, C, 1, 1) + eps).sqrt()
        if t <= max(RENORM_MIN_ITERS, warmup_iters):
            r = torch.ones_like(r)
        else:
            r = r.clamp(1 / 5, 5)
        running_var.copy_(momentum * running_var + (1 - momentum) * var.view(C))
        ctx.t, ctx.buffer_size, ctx.warmup_iters, ctx.eps = t, buffer_size, warmup_iters, eps
        ctx.buffer_gz = buffer_gz
        ctx.save_for_backward(z, var, weight, r)
        return weight.view(1, C, 1, 1) * (r * z) + bias.view(1, C, 1, 1)

    @staticmethod
    def backward(ctx, grad_output):
        z, var, weight, r = ctx.saved_tensors
        t, B, eps = ctx.t, ctx.buffer_size, ctx.eps
        C = grad_output.size(1)
        g = grad_output * weight.view(1, C, 1, 1) * r
        gz = (g * z).mean(dim=(0, 2, 3))
        ctx.buffer_gz[t % B].copy_(gz)
        if t <= B or t < ctx.warmup_iters:
            mean_gz = gz.view(1, C, 1, 1)
        else:
            mean_gz = ctx.buffer_gz.mean(dim=0).view(1, C, 1, 1)
        gx = (g - z * mean_gz) / (var + eps).sqrt()
        gw = (grad_output * r * z).sum(dim=(0, 2, 3))
        gb = grad_output.sum(dim=(0, 2, 3))
        return gx, gw, gb, None, None, None, None, None, None, None, None


class OfficialStyleMABN2d(nn.Module):
    """Same state layout and constructor as d2norm's MovingAverageBatchNorm2d."""

    def __init__(self, num_features, buffer_size, warmup_iters=100, momentum=0.98, eps=1e-5):
        super().__init__()
        self.buffer_size, self.warmup_iters = buffer_size, warmup_iters
        self.momentum, self.eps = momentum, eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("iters", torch.zeros((), dtype=torch.int64))
        self.register_buffer("buffer_x2", torch.zeros(buffer_size, num_features))
        self.register_buffer("buffer_gz", torch.zeros(buffer_size, num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x):
        C = x.size(1)
        if self.training:
            self.iters.add_(1)
            return _OfficialStyleFunction.apply(
                x,
                self.weight,
                self.bias,
                self.running_var,
                self.buffer_x2,
                self.buffer_gz,
                self.iters,
                self.buffer_size,
                self.warmup_iters,
                self.momentum,
                self.eps,
            )
        x = x / (self.running_var.view(1, C, 1, 1) + self.eps).sqrt()
        return self.weight.view(1, C, 1, 1) * x + self.bias.view(1, C, 1, 1)
