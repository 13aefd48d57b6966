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


_WS_CONVENTIONS = ("sqrt_var", "std_plus_eps")


def check_ws_options(ws_eps, ws_convention):
    if ws_convention not in _WS_CONVENTIONS:
        raise ValueError(
            f"D2NORM.WS.CONVENTION must be one of {_WS_CONVENTIONS}, got {ws_convention!r}. "
            'Fix: set D2NORM.WS.CONVENTION "sqrt_var" (the paper\'s equation, default) or '
            '"std_plus_eps" (weights trained with mmcv ConvWS2d / the original WS code).'
        )
    if not (isinstance(ws_eps, (int, float)) and ws_eps >= 0):
        raise ValueError(
            f"D2NORM.WS.EPS must be a number >= 0, got {ws_eps!r}. Fix: set D2NORM.WS.EPS "
            "(default 1e-5)."
        )


class _StandardizesPrecedingConv:
    """Mixin: the conv feeding this norm gets Weight Standardization (see weight_transforms)."""

    ws_eps = 1e-5
    ws_convention = "sqrt_var"

    def prepare_preceding_conv(self, conv):
        apply_weight_transform(
            conv, WeightStandardization(eps=self.ws_eps, convention=self.ws_convention)
        )


class GroupNormWS(_StandardizesPrecedingConv, GroupNorm):
    """GN whose preceding conv is weight-standardized (``NORM: "GN+WS"``).

    The conv computes with Ŵ instead of W, per output channel c over its in/groups×kh×kw
    elements (``D2NORM.WS.CONVENTION``, ``D2NORM.WS.EPS``):

    * ``"sqrt_var"`` (default): Ŵ_c = (W_c − mean(W_c)) / √(var_biased(W_c) + ε), ε = 1e-5.
      This is the equation of the WS paper (Qiao et al. 2019, σ = √(E[W²] − μ² + ε)); ε sits
      inside the root, so a constant (e.g. zero-initialized) kernel gives a finite Ŵ.
    * ``"std_plus_eps"``: Ŵ_c = (W_c − mean(W_c)) / (std_unbiased(W_c) + ε), ε = 1e-5. This is
      what the released WS code and mmcv's ``ConvWS2d`` compute, hence what the WS-pretrained
      ImageNet weights and mmdetection's published GN+WS detectors were trained with. The
      GN+WS recipes under ``configs/`` that load those weights select it.

    For n = in/groups×kh×kw elements the two differ by the factor √(n/(n−1)) (0.02% for a
    3×3×256 kernel, 7% for a 1×1×8 one) plus the ε placement (relative size ~ε/std(W)); weights
    trained under one convention are slightly off under the other, so match the convention of
    the weights being loaded. GN's own ε is ``D2NORM.GN.EPS``.
    """

    def __init__(self, num_groups, num_channels, eps=1e-5, ws_eps=1e-5, ws_convention="sqrt_var"):
        check_ws_options(ws_eps, ws_convention)
        super().__init__(num_groups, num_channels, eps=eps)
        self.ws_eps = ws_eps
        self.ws_convention = ws_convention


class BatchNormWS(_StandardizesPrecedingConv, nn.BatchNorm2d):
    """BatchNorm2d whose preceding conv is weight-standardized (``NORM: "BN+WS"``); WS as in
    :class:`GroupNormWS`."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, ws_eps=1e-5, ws_convention="sqrt_var"):
        check_ws_options(ws_eps, ws_convention)
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.ws_eps = ws_eps
        self.ws_convention = ws_convention
