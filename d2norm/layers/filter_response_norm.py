"""Filter Response Normalization with a Thresholded Linear Unit (FRN + TLU; Singh & Krishnan,
CVPR 2020), pure torch.

Per sample n and channel c, over the H×W positions of the feature map::

    ν²  = mean_{h,w}(x²)                  (no mean subtraction)
    x̂   = x / √(ν² + ε)
    y   = γ·x̂ + β
    z   = max(y, τ)                       (TLU, learned per-channel threshold τ; initialized 0)

ε is ``D2NORM.FRN.EPS`` (paper: 1e-6). With ``D2NORM.FRN.LEARNABLE_EPS`` the paper's learned
variant is used: ε = EPS + |ε_l|, ε_l a per-channel parameter initialized to
``D2NORM.FRN.LEARNED_EPS_INIT`` (1e-4). No batch statistics and no running state: eval equals
train, for any batch size (including 1); nothing folds into the conv.

**The TLU and detectron2's ReLUs.** In the paper, FRN + TLU *replaces* BN + ReLU. detectron2
applies its own ReLU after most norms, and ReLU(max(y, τ)) = max(y, max(τ, 0)): a TLU whose
threshold is floored at 0 (τ < 0 has no effect and gets no gradient). d2norm's model-preparation
pass (:func:`d2norm.modeling.sites.prepare_norm_sites`) places the activation per call site:

* box / mask head convs (``Conv2d(activation=ReLU)``, a module attribute): the conv's ReLU is
  removed and the TLU is the activation (``D2NORM.FRN.REPLACE_RELU True``, default; ``False``
  keeps the ReLU after the TLU, the variant measured in the project's notes);
* ResNet stem conv and the first conv(s) of each block, followed by a *functional*
  ``F.relu_`` inside detectron2's ``forward``: the TLU is kept and the ReLU stays, so these
  sites compute max(y, max(τ, 0)). τ starts at 0 and the ReLU's derivative at 0 is 0, so τ gets
  no gradient there and stays exactly 0 (verified on the trained synthetic model): these sites
  are FRN + ReLU, the TLU has no effect — the cost of not rewriting detectron2's block code;
* sites with no ReLU after the norm (the last conv of each residual branch and the shortcut,
  before the addition; FPN lateral / output convs): FRN without TLU, z = y, as BN would be.

A layer built outside :func:`d2norm.build_model` keeps its TLU.
"""

import torch
from torch import nn

__all__ = ["FilterResponseNorm2d", "check_frn_options", "frn_forward"]


def check_frn_options(eps, learnable_eps, learned_eps_init):
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(
            f"D2NORM.FRN.EPS must be > 0, got {eps!r}. Fix: set D2NORM.FRN.EPS to 1e-6 (the paper's "
            "value; with LEARNABLE_EPS it is the lower bound of ε)."
        )
    if not isinstance(learnable_eps, bool):
        raise ValueError(f"D2NORM.FRN.LEARNABLE_EPS must be True or False, got {learnable_eps!r}.")
    if (
        isinstance(learned_eps_init, bool)
        or not isinstance(learned_eps_init, (int, float))
        or not (learned_eps_init >= 0)
    ):
        raise ValueError(
            f"D2NORM.FRN.LEARNED_EPS_INIT must be a number >= 0, got {learned_eps_init!r}. Fix: set "
            "it to 1e-4 (the paper's initial value of the learned part of ε)."
        )


class FilterResponseNorm2d(nn.Module):
    """FRN + TLU for ``(N, C, H, W)`` inputs (``NORM: "FRN"``); see the module docstring.

    Args:
        num_features: C.
        eps: ε, or its lower bound ε₀ with ``learnable_eps`` (``D2NORM.FRN.EPS``).
        learnable_eps: ε = eps + |ε_l| with a learned per-channel ε_l (``D2NORM.FRN.LEARNABLE_EPS``).
        learned_eps_init: initial ε_l (``D2NORM.FRN.LEARNED_EPS_INIT``).
        activation: apply the TLU (the preparation pass turns it off where no ReLU follows).
        replace_relu: read by the preparation pass: remove a head conv's ReLU after this norm
            (``D2NORM.FRN.REPLACE_RELU``).

    Parameters: ``weight`` (γ), ``bias`` (β), ``tau`` (τ; ``None`` without activation),
    ``eps_learned`` (ε_l; only with ``learnable_eps``).
    """

    def __init__(
        self,
        num_features,
        eps=1e-6,
        learnable_eps=False,
        learned_eps_init=1e-4,
        activation=True,
        replace_relu=True,
    ):
        super().__init__()
        check_frn_options(eps, learnable_eps, learned_eps_init)
        self.num_features = int(num_features)
        self.eps = float(eps)
        self.learnable_eps = learnable_eps
        self.learned_eps_init = float(learned_eps_init)
        self.replace_relu = bool(replace_relu)
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        if activation:
            self.tau = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("tau", None)
        if learnable_eps:
            self.eps_learned = nn.Parameter(torch.full((num_features,), float(learned_eps_init)))
        else:
            self.register_parameter("eps_learned", None)

    @property
    def activation(self):
        return self.tau is not None

    def drop_activation(self):
        """Remove the TLU (and its parameter τ, so that no parameter goes unused); idempotent."""
        if self.tau is not None:
            del self.tau
            self.register_parameter("tau", None)
        return self

    def extra_repr(self):
        return (
            f"{self.num_features}, eps={self.eps}, learnable_eps={self.learnable_eps}, tlu={self.activation}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"FilterResponseNorm2d expects (N, C, H, W) input, got shape {tuple(x.shape)}")
        if x.numel() == 0:  # nothing to normalize: an empty output connected to the parameters
            y = x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
            return y if self.tau is None else torch.maximum(y, self.tau.view(1, -1, 1, 1))
        if torch.is_grad_enabled() and not torch.jit.is_tracing():
            return _FRNFunction.apply(x, self.weight, self.bias, self.tau, self.eps_learned, self.eps)
        # inference, TorchScript tracing and ONNX export: the same operations, without the custom
        # autograd Function (its in-place ``out=`` maximum has no ONNX translation)
        return frn_forward(x, self.weight, self.bias, self.tau, self.eps_learned, self.eps)


def frn_forward(x, weight, bias, tau, eps_learned, eps0):
    """FRN (+ TLU where ``tau`` is given) out of place: the numbers of :class:`_FRNFunction`'s
    forward, operation for operation, in ops that trace and export (ONNX)."""
    n, c, h, w = x.shape
    nu2 = torch.linalg.vector_norm(x, 2, dim=(2, 3)).square().div(h * w)  # (N, C)
    eps = eps0 if eps_learned is None else eps_learned.abs() + eps0
    inv = torch.rsqrt(nu2 + eps)
    y = torch.addcmul(bias.view(1, c, 1, 1), x, (inv * weight).view(n, c, 1, 1))
    return y if tau is None else torch.maximum(y, tau.view(1, c, 1, 1))


class _FRNFunction(torch.autograd.Function):
    """FRN (+ TLU) with a hand-written backward: two passes forward, four backward.

    With M = H·W, inv = 1/√(ν² + ε) per (n, c), x̂ = x·inv, g the upstream gradient and
    g_y = g·[γx̂ + β > τ] (g without TLU)::

        S   = Σ_hw g_y·x                      (per n, c)
        dx  = γ·inv·g_y − x·γ·inv³·S/M        (= γ·inv·(g_y − x̂·mean_hw(g_y·x̂)))
        dγ  = Σ_n inv·S      dβ = Σ g_y       dτ = Σ (g − g_y)
        dε  = −½ Σ_n γ·inv³·S,   dε_l = dε·sign(ε_l)
    """

    @staticmethod
    def forward(ctx, x, weight, bias, tau, eps_learned, eps0):
        n, c, h, w = x.shape
        nu2 = torch.linalg.vector_norm(x, 2, dim=(2, 3)).square_().div_(h * w)  # (N, C), one pass
        eps = eps0 if eps_learned is None else eps_learned.abs() + eps0
        inv = torch.rsqrt(nu2 + eps)
        scale = (inv * weight).view(n, c, 1, 1)
        y = torch.addcmul(bias.view(1, c, 1, 1), x, scale)
        if tau is not None:
            torch.maximum(y, tau.view(1, c, 1, 1), out=y)
        ctx.save_for_backward(x, inv, weight, bias, tau, eps_learned)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, inv, weight, bias, tau, eps_learned = ctx.saved_tensors
        n, c, h, w = x.shape
        d_tau = None
        if tau is not None:
            pre = torch.addcmul(bias.view(1, c, 1, 1), x, (inv * weight).view(n, c, 1, 1))
            passed = pre > tau.view(1, c, 1, 1)
            g_y = torch.where(passed, g, 0.0)
            if ctx.needs_input_grad[3]:
                d_tau = (g - g_y).sum(dim=(0, 2, 3))
        else:
            g_y = g
        s = (g_y * x).sum(dim=(2, 3))  # (N, C)
        ginv3s = weight * inv.pow(3) * s  # γ·inv³·S
        d_x = d_w = d_b = d_eps = None
        if ctx.needs_input_grad[0]:
            d_x = torch.mul(g_y, (weight * inv).view(n, c, 1, 1))
            d_x.addcmul_(x, ginv3s.view(n, c, 1, 1), value=-1.0 / (h * w))
        if ctx.needs_input_grad[1]:
            d_w = (inv * s).sum(dim=0)
        if ctx.needs_input_grad[2]:
            d_b = g_y.sum(dim=(0, 2, 3))
        if eps_learned is not None and ctx.needs_input_grad[4]:
            d_eps = -0.5 * ginv3s.sum(dim=0) * torch.sign(eps_learned)
        return d_x, d_w, d_b, d_tau, d_eps, None
