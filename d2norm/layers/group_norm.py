"""Group Normalization (Wu & He, 2018) with a config-checked number of groups.

For each sample n and group g of C/G channels: ŷ = (x − μ_{n,g})/√(σ²_{n,g} + ε) (biased variance
over the group's channels and H×W), y = γ_c·ŷ + β_c. Identical in train and eval; computed by
``torch.nn.GroupNorm``.
"""
from torch import nn

from .weight_transforms import WeightStandardization, apply_weight_transform

__all__ = ["GroupNorm", "GroupNormWS", "BatchNormWS", "check_num_groups"]


def check_num_groups(num_groups, num_channels):
    if not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(
            f"D2NORM.GN.NUM_GROUPS must be a positive integer, got {num_groups!r}. "
            "Fix: set D2NORM.GN.NUM_GROUPS (default 32)."
        )
    if num_channels % num_groups != 0:
        raise ValueError(
            f"GroupNorm: D2NORM.GN.NUM_GROUPS={num_groups} does not divide the {num_channels} "
            f"channels of a layer. Fix: choose D2NORM.GN.NUM_GROUPS dividing every normalized "
            f"channel count (e.g. 32, 16 or 8 for widths that are multiples of 32)."
        )


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` whose constructor explains a bad group count (``NORM: "GN"``)."""

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True):
        check_num_groups(num_groups, num_channels)
        super().__init__(num_groups, num_channels, eps=eps, affine=affine)


class _StandardizesPrecedingConv:
    """Mixin: the conv feeding this norm gets Weight Standardization (see weight_transforms)."""

    ws_eps = 1e-5

    def prepare_preceding_conv(self, conv):
        apply_weight_transform(conv, WeightStandardization(eps=self.ws_eps))


class GroupNormWS(_StandardizesPrecedingConv, GroupNorm):
    """GN whose preceding conv is weight-standardized (``NORM: "GN+WS"``)."""

    def __init__(self, num_groups, num_channels, eps=1e-5, ws_eps=1e-5):
        super().__init__(num_groups, num_channels, eps=eps)
        self.ws_eps = ws_eps


class BatchNormWS(_StandardizesPrecedingConv, nn.BatchNorm2d):
    """BatchNorm2d whose preceding conv is weight-standardized (``NORM: "BN+WS"``)."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, ws_eps=1e-5):
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.ws_eps = ws_eps
