"""EvoNorm-S0 (Liu, Brock, Simonyan & Le, "Evolving Normalization-Activation Layers", NeurIPS
2020), pure torch.

Per sample n and group g of C/G consecutive channels (G = ``D2NORM.EVONORM.NUM_GROUPS``, 32 as
in the paper, which takes its grouping from Group Normalization)::

    group_std(x) = √(var_{c∈g, h, w}(x) + ε)     (biased variance over C/G × H × W of one sample)
    y = x · σ(v·x) / group_std(x) · γ + β          σ = sigmoid; v, γ, β per channel (v, γ init 1, β 0)

Batch-independent: eval equals train; no running state; nothing folds into the conv. Without
its nonlinearity (the sites below) the layer is y = x / group_std(x) · γ + β.

EvoNorm-S0 includes the activation (x·σ(v·x), a learned Swish) and replaces BN + ReLU. d2norm's
model-preparation pass (:func:`d2norm.modeling.sites.prepare_norm_sites`) places it per call
site exactly as for FRN (see :mod:`d2norm.layers.filter_response_norm`): box / mask head convs
lose their ReLU (``D2NORM.EVONORM.REPLACE_RELU True``, default); the ResNet stem / first block
convs keep detectron2's functional ReLU after EvoNorm (ReLU(x·σ(v·x)/std·γ + β): the negative
part the Swish lets through is cut off there); sites without a ReLU (residual-branch ends,
shortcuts, FPN) use the layer without its nonlinearity.
"""

import torch
from torch import nn

from .base import refuse_unusable

__all__ = ["EvoNormS0", "check_evonorm_options"]


def check_evonorm_options(num_groups, num_channels, eps):
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(
            f"D2NORM.EVONORM.NUM_GROUPS must be a positive integer, got {num_groups!r}. Fix: set "
            "D2NORM.EVONORM.NUM_GROUPS (default 32, the paper's value)."
        )
    if num_channels % num_groups != 0:
        raise ValueError(
            f"EvoNorm-S0: D2NORM.EVONORM.NUM_GROUPS={num_groups} does not divide the {num_channels} "
            f"channels of a layer. Fix: choose D2NORM.EVONORM.NUM_GROUPS dividing every normalized "
            f"channel count (e.g. 32, 16 or 8 for widths that are multiples of 32)."
        )
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"D2NORM.EVONORM.EPS must be > 0, got {eps!r}. Fix: set it to 1e-5 (default).")


class EvoNormS0(nn.Module):
    """EvoNorm-S0 for ``(N, C, H, W)`` inputs (``NORM: "EvoNorm-S0"``); see the module docstring.

    Args:
        num_features: C.
        num_groups: G, dividing C (``D2NORM.EVONORM.NUM_GROUPS``).
        eps: ε (``D2NORM.EVONORM.EPS``).
        activation: use the nonlinearity x·σ(v·x) (the preparation pass turns it off where no
            ReLU follows).
        replace_relu: read by the preparation pass (``D2NORM.EVONORM.REPLACE_RELU``).

    Parameters: ``weight`` (γ), ``bias`` (β), ``v`` (``None`` without activation).
    """

    def __init__(self, num_features, num_groups=32, eps=1e-5, activation=True, replace_relu=True):
        super().__init__()
        check_evonorm_options(num_groups, num_features, eps)
        self.num_features = int(num_features)
        self.num_groups = num_groups
        self.eps = float(eps)
        self.replace_relu = bool(replace_relu)
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        if activation:
            self.v = nn.Parameter(torch.ones(num_features))
        else:
            self.register_parameter("v", None)

    @classmethod
    def type_probe(cls, num_groups, num_channels, **kwargs):
        """A layer of this class for fewer channels than groups, which refuses to run.

        detectron2's ``RetinaNetHead`` builds ``get_norm(norm, 1)`` only to read the layer's type
        (as for GN, :meth:`d2norm.layers.GroupNorm.type_probe`): the returned layer has one group
        per channel, raises when called and carries ``unusable`` (the reason), which
        ``d2norm.prepare_model`` reports with the module's path if it ends up in a model."""
        check_evonorm_options(num_groups, num_groups, kwargs.get("eps", 1e-5))
        if num_channels >= num_groups:
            raise ValueError(
                f"type_probe is for fewer channels than groups, got {num_channels} "
                f"channels and {num_groups} groups"
            )
        layer = cls(num_channels, num_groups=num_channels, **kwargs)
        layer.unusable = (
            f"EvoNorm-S0: D2NORM.EVONORM.NUM_GROUPS={num_groups} groups cannot split the "
            f"{num_channels} channel(s) of this layer. Fix: choose D2NORM.EVONORM.NUM_GROUPS dividing "
            f"every normalized channel count."
        )
        layer.register_forward_pre_hook(refuse_unusable)
        return layer

    @property
    def activation(self):
        return self.v is not None

    def drop_activation(self):
        """Remove the nonlinearity (and its parameter v); idempotent."""
        if self.v is not None:
            del self.v
            self.register_parameter("v", None)
        return self

    def extra_repr(self):
        return (
            f"{self.num_features}, num_groups={self.num_groups}, eps={self.eps}, nonlinear={self.activation}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"EvoNormS0 expects (N, C, H, W) input, got shape {tuple(x.shape)}")
        n, c, h, w = x.shape
        g = self.num_groups
        if x.numel() == 0:  # no statistics to take: an empty output connected to γ, β
            return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        var = torch.var(x.reshape(n, g, (c // g) * h * w), dim=2, unbiased=False)  # (N, G)
        inv_std = torch.rsqrt(var + self.eps).repeat_interleave(c // g, dim=1)  # (N, C)
        scale = (inv_std * self.weight).view(n, c, 1, 1)
        if self.v is not None:
            x = x * torch.sigmoid(x * self.v.view(1, -1, 1, 1))
        return torch.addcmul(self.bias.view(1, -1, 1, 1), x, scale)
