"""BatchNorm with frozen running statistics and trainable affine parameters ("FrozenStatsBN").

Per channel c, in training and in eval alike:

    y = γ_c · (x − running_mean_c) / √(running_var_c + ε) + β_c

``running_mean`` / ``running_var`` come from the pretrained weights and are never updated (no
batch statistics are computed, ``momentum`` plays no part); γ and β are ``nn.Parameter``\\ s and
train. Gradients:

    ∂L/∂γ_c = Σ_{n,h,w} g · (x − running_mean_c) / √(running_var_c + ε),   ∂L/∂β_c = Σ_{n,h,w} g,
    ∂L/∂x   = g · γ_c / √(running_var_c + ε)              (g = ∂L/∂y)

This is the backbone norm of mmdetection's ResNet with ``norm_eval=True`` and a trainable BN
(``requires_grad=True`` / ``frozen=False``): its ``train()`` puts every ``nn.BatchNorm2d`` of the
backbone in eval mode, so the statistics stay those of ImageNet pre-training while the affine
parameters are fine-tuned. It differs from detectron2's ``FrozenBatchNorm2d`` ("BN*"), whose γ
and β are frozen too.

The layer is an ``nn.BatchNorm2d``, so everything that treats BN as a norm treats it as one:
detectron2's optimizer gives its γ/β ``SOLVER.WEIGHT_DECAY_NORM``, detectron2's ``freeze``
(``MODEL.BACKBONE.FREEZE_AT``) turns it into a ``FrozenBatchNorm2d`` in frozen stages, and
:func:`d2norm.deploy.fold` folds its eval map into the preceding conv. Like mmdetection's layer
it stays in eval mode when the model trains (``training`` is always False), so Precise BN, which
recomputes the statistics of training-mode BN layers, leaves it alone.
"""

from torch import nn
from torch.nn import functional as F

__all__ = ["FrozenStatisticsBatchNorm2d"]


class FrozenStatisticsBatchNorm2d(nn.BatchNorm2d):
    """``y = γ·(x − running_mean)/√(running_var + ε) + β`` with fixed statistics, trainable γ, β.

    Same constructor and state dict as ``nn.BatchNorm2d`` (``running_mean``, ``running_var``,
    ``num_batches_tracked``), so BN weights (torchvision, mmdetection) load unchanged.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, device=None, dtype=None):
        super().__init__(
            num_features,
            eps=eps,
            momentum=momentum,
            affine=affine,
            track_running_stats=True,
            device=device,
            dtype=dtype,
        )
        self.training = False  # see train()

    def train(self, mode=True):
        """Stays in eval mode, as mmdetection's ``norm_eval`` keeps it: ``model.train()`` leaves
        ``self.training`` False, so tools that recompute BN statistics of training-mode layers
        (detectron2's Precise BN) skip it. Parameters still receive gradients."""
        return super().train(False)

    def forward(self, x):
        self._check_input_dim(x)
        # training=False: normalize with the running statistics and never update them
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )

    def extra_repr(self):
        return super().extra_repr() + ", statistics=frozen"
