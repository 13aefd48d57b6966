"""What d2norm's norm layers share: the conv protocol and the eval map.

**Norms that need their conv.** detectron2's ``get_norm(name, C)`` never sees the conv whose
output the norm normalizes, yet some norms need it: Weight Standardization ("GN+WS", "BN+WS")
and weight centralization ("MABN") transform that conv's weight, and "CBN" reads its input and
weight. Such a norm derives from :class:`ConvFedNorm`, the one written protocol:

* ``conv_requirement``: what it needs of the conv, in words (for error messages);
* ``conv_without_bias``: whether the conv must have no bias (CBN, MABN);
* ``conv_transform()``: the parametrization it puts on the conv weight, or None;
* ``prepare_preceding_conv(conv, shared=False)``: do that (idempotent); ``shared``: other
  per-call copies of this norm normalize the same conv (RetinaNet's per-level copies);
* ``conv_prepared``: whether ``prepare_preceding_conv`` has run;
* ``release_conv()``: undo what the norm keeps at the conv beyond the weight transform (CBN's
  input hand-over), when the layer is replaced by its eval map.

d2norm's preparation pass (:func:`d2norm.prepare_model`) finds the conv and calls
``prepare_preceding_conv``.

**The eval map.** Every norm with running statistics computes, in eval mode, a per-channel
affine map. :meth:`eval_statistics` returns it once, in batch-norm form
(:class:`EvalStatistics`: γ, β, μ, σ², ε with ``y = γ·(x − μ)/√(σ² + ε) + β``); freezing
(the ``FrozenBatchNorm2d`` of a frozen stage), folding into the conv (``d2norm.deploy``) and
the table's capability questions all read it.
"""

from typing import NamedTuple, Optional

import torch

from .weight_transforms import apply_weight_transform

__all__ = ["ConvFedNorm", "EvalStatistics"]


class EvalStatistics(NamedTuple):
    """A norm's eval map in batch-norm form: ``y = weight·(x − mean)/√(var + eps) + bias``.

    ``weight`` / ``bias`` None: 1 / 0 (``affine=False``); ``mean`` None: 0 (MABN)."""

    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    mean: Optional[torch.Tensor]
    var: torch.Tensor
    eps: float

    def scale_shift(self):
        """``(scale, shift)``, float64 per-channel tensors with ``y = x·scale + shift``."""
        f64 = torch.float64
        var = self.var.detach().to(f64).reshape(-1)

        def f64_or(t, fill):
            return torch.full_like(var, fill) if t is None else t.detach().to(f64).reshape(-1)

        scale = f64_or(self.weight, 1.0) * torch.rsqrt(var + self.eps)
        return scale, f64_or(self.bias, 0.0) - f64_or(self.mean, 0.0) * scale


class ConvFedNorm:
    """Base class of the norms that need the conv feeding them (see the module docstring).

    Subclasses set ``conv_requirement`` and either return a parametrization from
    :meth:`conv_transform` (the default ``prepare_preceding_conv`` registers it) or override
    ``prepare_preceding_conv`` (CBN binds to the conv)."""

    conv_requirement = "the conv whose output it normalizes"
    conv_without_bias = False
    #: set on the instance by prepare_preceding_conv
    conv_prepared = False

    def conv_transform(self):
        """The parametrization this norm puts on the weight of the conv that feeds it, or None."""
        return None

    def prepare_preceding_conv(self, conv, shared=False):
        """Give ``conv`` (the conv whose output this norm normalizes) the weight transform; idempotent."""
        transform = self.conv_transform()
        if transform is not None:
            apply_weight_transform(conv, transform)
        self.conv_prepared = True
        return conv

    def release_conv(self):
        """Undo what this norm keeps at its conv beyond the weight transform; returns the conv or None."""
        return None


def refuse_unusable(module, args):
    """Forward pre-hook of a layer whose options cannot be what its name says: raises the
    layer's ``unusable`` message (the problem and the fix) at its first forward."""
    raise RuntimeError(module.unusable)
