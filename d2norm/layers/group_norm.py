"""Group Normalization (Wu & He, 2018) with a config-checked number of groups.

For each sample n and group g of C/G channels: ŷ = (x − μ_{n,g})/√(σ²_{n,g} + ε) (biased variance
over the group's channels and H×W), y = γ_c·ŷ + β_c. Identical in train and eval; computed by
``torch.nn.GroupNorm``.
"""

from torch import nn

from .base import ConvFedNorm, EvalStatistics, refuse_unusable
from .weight_transforms import WeightStandardization, check_ws_options, release_transformed_weight

__all__ = ["GroupNorm", "GroupNormWS", "BatchNormWS", "check_num_groups", "check_ws_options"]


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

    @classmethod
    def type_probe(cls, num_groups, num_channels, **kwargs):
        """A layer of this class for fewer channels than groups, which refuses to run.

        detectron2 v0.6's ``RetinaNetHead`` calls ``get_norm(norm, 1)`` only to read the layer's
        type (main calls ``get_norm(norm, 32)``); a GN of ``num_groups`` groups cannot exist for
        so few channels. The returned layer has one group per channel, raises when called, and
        carries ``unusable`` (the reason), which ``d2norm.prepare_model`` reports with the
        module's path if such a layer ends up in a model."""
        check_num_groups(num_groups, num_groups)  # a valid count (positive integer) or a clear error
        if num_channels >= num_groups:
            raise ValueError(
                f"type_probe is for fewer channels than groups, got {num_channels} "
                f"channels and {num_groups} groups"
            )
        layer = cls(num_channels, num_channels, **kwargs)
        layer.unusable = (
            f"GroupNorm: D2NORM.GN.NUM_GROUPS={num_groups} groups cannot split the {num_channels} "
            f"channel(s) of this layer. Fix: choose D2NORM.GN.NUM_GROUPS dividing every normalized "
            f"channel count (e.g. 32, 16 or 8 for widths that are multiples of 32)."
        )
        layer.register_forward_pre_hook(refuse_unusable)
        return layer


class _StandardizesPrecedingConv(ConvFedNorm):
    """The conv feeding this norm gets Weight Standardization (see weight_transforms)."""

    ws_eps = 1e-5
    ws_convention = "sqrt_var"
    conv_requirement = "Weight Standardization of the conv before it"

    def conv_transform(self):
        """The parametrization this norm puts on the weight of the conv that feeds it."""
        return WeightStandardization(eps=self.ws_eps, convention=self.ws_convention)

    def forward(self, x):
        release_transformed_weight(x)  # the conv's W_hat is rebuilt in backward, not kept
        return super().forward(x)


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


class BatchNormWS(_StandardizesPrecedingConv, nn.modules.batchnorm._BatchNorm):
    """BatchNorm (4-D input) whose preceding conv is weight-standardized (``NORM: "BN+WS"``); WS
    as in :class:`GroupNormWS`, BN as ``nn.BatchNorm2d``.

    It derives from torch's ``_BatchNorm``, not from ``nn.BatchNorm2d``, on purpose: detectron2's
    ``FrozenBatchNorm2d.convert_frozen_batchnorm`` (run by ``MODEL.BACKBONE.FREEZE_AT`` while the
    model is built, before d2norm's preparation pass) would turn a ``BatchNorm2d`` into a
    ``FrozenBatchNorm2d`` and the conv before it would lose its Weight Standardization. Left to
    d2norm, a frozen BN+WS becomes a ``FrozenBatchNorm2d`` after a conv that keeps WS
    (:func:`d2norm.convert_frozen_norms`)."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, ws_eps=1e-5, ws_convention="sqrt_var"):
        check_ws_options(ws_eps, ws_convention)
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.ws_eps = ws_eps
        self.ws_convention = ws_convention

    def eval_statistics(self):
        """The eval map (see :mod:`d2norm.layers.base`); None without running statistics."""
        if self.running_var is None:
            return None
        return EvalStatistics(self.weight, self.bias, self.running_mean, self.running_var, self.eps)

    def _check_input_dim(self, input):
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")
