"""Independent float64 references for BRN, FRN + TLU and EvoNorm-S0, written from the papers.

* :class:`BatchRenormReference` — Batch Renormalization (Ioffe 2017, Algorithm 1 and its
  backward equations), one channel at a time, Python floats for r, d and the running
  statistics, Python ints and ``if`` for the iteration counter and the ramp, and the paper's
  explicit gradient formulas (no autograd).
* :func:`frn_tlu` — FRN + TLU (Singh & Krishnan 2020, Eq. 1-3), a loop over samples and
  channels; gradients by float64 autograd of this plain expression.
* :func:`evonorm_s0` — EvoNorm-S0 (Liu et al. 2020), a loop over samples and groups; gradients
  by float64 autograd.
"""

import math

import torch

F64 = torch.float64


def ramp_limits(t, r_max, d_max, start, r_end, d_end):
    """The paper's relaxation of the bounds, linear between ``start`` and each end iteration."""

    def frac(end):
        if t <= start:
            return 0.0 if (end > start or t < start) else 1.0
        if t >= end:
            return 1.0
        return (t - start) / (end - start)

    return 1.0 + (r_max - 1.0) * frac(r_end), d_max * frac(d_end)


class BatchRenormReference:
    """float64 BRN of one layer: ``forward(x, gamma, beta)`` then ``backward(dy)`` each step."""

    def __init__(self, num_features, r_max, d_max, start, r_end, d_end, momentum, eps):
        self.C = num_features
        self.r_max, self.d_max = r_max, d_max
        self.start, self.r_end, self.d_end = start, r_end, d_end
        self.alpha, self.eps = momentum, eps
        self.mu = [0.0] * num_features
        self.sigma = [1.0] * num_features
        self.t = 0  # training steps done
        self.clipped_r = self.clipped_d = 0  # how often r / d were clipped (summed over channels)

    def forward(self, x, gamma, beta):
        x = x.detach().to(F64)
        gamma, beta = gamma.detach().to(F64).tolist(), beta.detach().to(F64).tolist()
        rmax, dmax = ramp_limits(self.t, self.r_max, self.d_max, self.start, self.r_end, self.d_end)
        y = torch.empty_like(x)
        self._cache = []
        for c in range(self.C):
            xc = x[:, c]
            m = xc.numel()
            mu_b = float(xc.sum()) / m
            sigma_b = math.sqrt(float(((xc - mu_b) ** 2).sum()) / m + self.eps)
            r_raw = sigma_b / self.sigma[c]
            d_raw = (mu_b - self.mu[c]) / self.sigma[c]
            r = min(max(r_raw, 1.0 / rmax), rmax)
            d = min(max(d_raw, -dmax), dmax)
            self.clipped_r += r != r_raw
            self.clipped_d += d != d_raw
            xhat = (xc - mu_b) / sigma_b * r + d
            y[:, c] = gamma[c] * xhat + beta[c]
            self._cache.append((xc, mu_b, sigma_b, r, xhat, gamma[c], m))
            self.mu[c] += self.alpha * (mu_b - self.mu[c])
            self.sigma[c] += self.alpha * (sigma_b - self.sigma[c])
        self.t += 1
        return y

    def backward(self, dy):
        """The paper's gradients (r, d treated as constants)."""
        dy = dy.detach().to(F64)
        dx = torch.empty_like(dy)
        dgamma, dbeta = [], []
        for c, (xc, mu_b, sigma_b, r, xhat, g, m) in enumerate(self._cache):
            dyc = dy[:, c]
            dxhat = dyc * g
            dsigma = float((dxhat * (xc - mu_b)).sum()) * (-r / sigma_b**2)
            dmu = float(dxhat.sum()) * (-r / sigma_b)
            dx[:, c] = dxhat * r / sigma_b + dsigma * (xc - mu_b) / (m * sigma_b) + dmu / m
            dgamma.append(float((dyc * xhat).sum()))
            dbeta.append(float(dyc.sum()))
        return dx, torch.tensor(dgamma, dtype=F64), torch.tensor(dbeta, dtype=F64)

    def eval(self, x, gamma, beta):
        x = x.detach().to(F64)
        gamma, beta = gamma.detach().tolist(), beta.detach().tolist()
        y = torch.empty_like(x)
        for c in range(self.C):
            y[:, c] = float(gamma[c]) * (x[:, c] - self.mu[c]) / self.sigma[c] + float(beta[c])
        return y


def frn_tlu(x, gamma, beta, tau, eps, eps_learned=None):
    """FRN (+ TLU if ``tau`` is not None) of float64 tensors, sample by sample and channel by
    channel: nu2 = mean(x^2) over H x W, y = gamma x / sqrt(nu2 + eps) + beta, z = max(y, tau).
    With ``eps_learned``: eps + |eps_learned| per channel."""
    n_, c_ = x.shape[:2]
    out = []
    for n in range(n_):
        chans = []
        for c in range(c_):
            v = x[n, c]
            nu2 = (v * v).sum() / v.numel()
            e = eps if eps_learned is None else eps + eps_learned[c].abs()
            y = gamma[c] * v / torch.sqrt(nu2 + e) + beta[c]
            if tau is not None:
                y = torch.where(y > tau[c], y, tau[c].expand_as(y))
            chans.append(y)
        out.append(torch.stack(chans))
    return torch.stack(out)


def evonorm_s0(x, gamma, beta, v, groups, eps):
    """EvoNorm-S0 of float64 tensors: per sample and group of C/G channels,
    std = sqrt(biased var over (C/G, H, W) + eps); y = x sigmoid(v x) / std * gamma + beta
    (without ``v``: y = x / std * gamma + beta)."""
    n_, c_ = x.shape[:2]
    cg = c_ // groups
    out = []
    for n in range(n_):
        chans = []
        for g in range(groups):
            block = x[n, g * cg : (g + 1) * cg]
            mean = block.sum() / block.numel()
            std = torch.sqrt(((block - mean) ** 2).sum() / block.numel() + eps)
            for k in range(cg):
                c = g * cg + k
                xc = x[n, c]
                num = xc * (1.0 / (1.0 + torch.exp(-v[c] * xc))) if v is not None else xc
                chans.append(num / std * gamma[c] + beta[c])
        out.append(torch.stack(chans))
    return torch.stack(out)
