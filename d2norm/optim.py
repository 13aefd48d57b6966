"""The optimizer: detectron2's parameter groups, with one rule for what a norm layer is.

detectron2's ``get_default_optimizer_params`` gives ``SOLVER.WEIGHT_DECAY_NORM`` to the
parameters of a fixed tuple of torch norm classes; CBN and MABN (``nn.Module`` subclasses) would
get ``SOLVER.WEIGHT_DECAY`` like a conv weight. Here the parameters of every module for which
:func:`d2norm.norms.is_norm_layer` holds (every d2norm norm, torch's BN / SyncBN / GN / LN /
InstanceNorm / LRN, detectron2's FrozenBN and CycleBatchNormList) are norm parameters. The rest
is detectron2's rule, unchanged: per parameter (each once, trainable only)

* lr = ``SOLVER.BASE_LR``, weight decay = the optimizer default ``SOLVER.WEIGHT_DECAY``;
* norm parameters: weight decay = ``SOLVER.WEIGHT_DECAY_NORM``;
* parameters named ``bias``: lr = ``BASE_LR * SOLVER.BIAS_LR_FACTOR``, weight decay =
  ``SOLVER.WEIGHT_DECAY_BIAS`` (these override the norm rule, as in detectron2),

then parameters with equal settings are merged into one group.
"""

import copy

import torch

from .norms import norm_layer_types

__all__ = ["get_param_groups", "build_optimizer"]


def get_param_groups(
    model, base_lr=None, weight_decay=None, weight_decay_norm=None, bias_lr_factor=1.0, weight_decay_bias=None
):
    """Parameter groups for a ``torch.optim`` optimizer; the arguments and their meaning are those
    of detectron2's ``get_default_optimizer_params`` (None: leave to the optimizer's default)."""
    from detectron2.solver.build import reduce_param_groups

    defaults = {}
    if base_lr is not None:
        defaults["lr"] = base_lr
    if weight_decay is not None:
        defaults["weight_decay"] = weight_decay
    bias = {}
    if bias_lr_factor is not None and bias_lr_factor != 1.0:
        if base_lr is None:
            raise ValueError("bias_lr_factor requires base_lr (SOLVER.BASE_LR).")
        bias["lr"] = base_lr * bias_lr_factor
    if weight_decay_bias is not None:
        bias["weight_decay"] = weight_decay_bias

    norm_types = norm_layer_types()
    params, seen = [], set()
    for module in model.modules():
        for name, value in module.named_parameters(recurse=False):
            if not value.requires_grad or value in seen:
                continue
            seen.add(value)
            hyper = copy.copy(defaults)
            if isinstance(module, norm_types) and weight_decay_norm is not None:
                hyper["weight_decay"] = weight_decay_norm
            if name == "bias":
                hyper.update(bias)
            params.append({"params": [value], **hyper})
    return reduce_param_groups(params)


def build_optimizer(cfg, model):
    """detectron2's ``build_optimizer`` (SGD from ``cfg.SOLVER``, with gradient clipping where
    ``SOLVER.CLIP_GRADIENTS`` asks for it) on :func:`get_param_groups`."""
    from detectron2.solver.build import maybe_add_gradient_clipping

    params = get_param_groups(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
    )
    return maybe_add_gradient_clipping(cfg, torch.optim.SGD)(
        params,
        lr=cfg.SOLVER.BASE_LR,
        momentum=cfg.SOLVER.MOMENTUM,
        nesterov=cfg.SOLVER.NESTEROV,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
    )
