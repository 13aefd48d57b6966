"""An independent float64 reference for Batch-Channel Normalization, written from the paper
(Qiao et al., arXiv:1911.09738: Algorithm 1 "micro-batch BCN", and BCN = BN then channel
normalization), one channel / sample / group at a time. Gradients come from autograd through
these loops, so they check the layer's fused ops (``batch_norm_update_stats``, ``addcmul``,
``torch.batch_norm``, ``F.group_norm``) and its affine expansion.

:class:`BCNReference` keeps the state (μ̂, σ̂², t) as float64 tensors and plain ints.
"""

import torch

__all__ = ["BCNReference"]


class BCNReference:
    """BCN of float64 tensors; ``step(x, params, training)`` returns the output and advances the
    state in training.

    ``params``: dict of float64 tensors ``gamma_b``, ``beta_b`` (C values), ``gamma_c``,
    ``beta_c`` (G values for ``affine="group"``, C for ``"channel"``), which may require grad.
    """

    def __init__(self, channels, groups, eps, mode, moving_speed, schedule, affine="group"):
        self.C, self.G, self.eps = channels, groups, eps
        self.mode, self.r, self.schedule, self.affine = mode, moving_speed, schedule, affine
        self.mean = torch.zeros(channels, dtype=torch.float64)
        self.var = torch.ones(channels, dtype=torch.float64)
        self.t = 0

    def rate(self):
        if self.schedule == "cumulative":
            return max(self.r, 1.0 / (self.t + 1))
        return self.r

    def _batch_part(self, x, p, training):
        N, C, H, W = x.shape
        m = N * H * W
        out = []
        r = self.rate()
        new_mean, new_var = self.mean.clone(), self.var.clone()
        for c in range(C):
            v = x[:, c].reshape(-1)
            if training and self.mode == "batch":
                mu = v.sum() / m
                var = ((v - mu) ** 2).sum() / m
                xhat = (v - mu) / torch.sqrt(var + self.eps)
                with torch.no_grad():
                    new_mean[c] = self.mean[c] + r * (mu - self.mean[c])
                    new_var[c] = self.var[c] + r * (var * m / (m - 1) - self.var[c])
            else:
                mean_c, var_c = self.mean[c], self.var[c]
                if training:  # Algorithm 1, lines 1-4: no gradient through the estimates
                    with torch.no_grad():
                        mu_dot = v.sum() / m
                        var_dot = ((v - self.mean[c]) ** 2).sum() / m
                        mean_c = self.mean[c] + r * (mu_dot - self.mean[c])
                        var_c = self.var[c] + r * (var_dot - self.var[c])
                        new_mean[c], new_var[c] = mean_c, var_c
                xhat = (v - mean_c) / torch.sqrt(var_c + self.eps)
            out.append((p["gamma_b"][c] * xhat + p["beta_b"][c]).reshape(N, H, W))
        if training:
            self.mean, self.var, self.t = new_mean, new_var, self.t + 1
        return torch.stack(out, dim=1)

    def _channel_part(self, x, p):
        N, C, H, W = x.shape
        k = C // self.G
        rows = []
        for n in range(N):
            chans = []
            for g in range(self.G):
                block = x[n, g * k : (g + 1) * k]
                mu = block.sum() / block.numel()
                var = ((block - mu) ** 2).sum() / block.numel()
                xhat = (block - mu) / torch.sqrt(var + self.eps)
                for j in range(k):
                    i = g if self.affine == "group" else g * k + j
                    chans.append(p["gamma_c"][i] * xhat[j] + p["beta_c"][i])
            rows.append(torch.stack(chans))
        return torch.stack(rows)

    def step(self, x, params, training=True):
        if x.shape[0] == 0:
            return x
        return self._channel_part(self._batch_part(x, params, training), params)
