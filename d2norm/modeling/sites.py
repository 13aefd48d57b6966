"""Call-site placement of the norms that carry their activation (part of :func:`d2norm.prepare_model`).

:func:`prepare_norm_sites` visits every detectron2 ``Conv2d`` carrying a norm whose table entry
has ``activation`` (FRN, EvoNorm-S0):

* **FRN / EvoNorm-S0** include their activation (TLU, x·σ(v·x)), which in the papers replaces
  the ReLU after BN. Per site (see :func:`relu_after`):

  - ``"module"``: the conv has ``activation`` = ReLU (box / mask head convs). With the norm's
    ``replace_relu`` (``D2NORM.FRN.REPLACE_RELU`` / ``D2NORM.EVONORM.REPLACE_RELU``, default
    True) the ReLU is removed (``conv.activation = None``); otherwise it stays after the
    norm's activation.
  - ``"functional"``: detectron2 calls ``F.relu_`` on the conv's output inside a ResNet block's
    ``forward`` (stem conv1; BasicBlock conv1; Bottleneck / DeformBottleneck conv1, conv2).
    The norm keeps its activation and the ReLU stays (d2norm does not rewrite detectron2's
    block code): FRN computes max(y, max(τ, 0)) there, and since τ starts at 0 and gets no
    gradient through the ReLU it stays 0 (FRN + ReLU); EvoNorm-S0 computes ReLU(its output).
  - in an ``nn.Sequential`` (RetinaNet's head subnets: conv, norm, ``nn.ReLU``, ...), an
    ``nn.ReLU`` registered right after the norm is replaced by ``nn.Identity`` (with
    ``replace_relu``); a norm that is not the ``norm`` of a conv and not followed by an
    ``nn.ReLU`` in a Sequential keeps its activation.
  - ``"none"``: nothing follows (residual-branch ends and shortcuts before the addition, FPN
    lateral / output convs): the norm's activation is removed (``drop_activation``), so the
    site computes the plain normalization, as BN would.

Idempotent (a second call changes nothing).
"""

import torch
from torch import nn
from torch.nn import functional as F

from ..norms import spec_of

__all__ = ["prepare_norm_sites", "relu_after"]


def _carries_activation(module):
    spec = spec_of(module)
    return spec is not None and spec.activation


# detectron2 ResNet modules and the attributes whose output goes through F.relu_ in forward()
# (detectron2/modeling/backbone/resnet.py: BasicStem, BasicBlock, BottleneckBlock,
# DeformBottleneckBlock)
_FUNCTIONAL_RELU_AFTER = {
    "BasicStem": ("conv1",),
    "BasicBlock": ("conv1",),
    "BottleneckBlock": ("conv1", "conv2"),
    "DeformBottleneckBlock": ("conv1", "conv2"),
}


_RELU_REPLACED = "_d2norm_relu_replaced"


def _is_relu(act):
    return isinstance(act, nn.ReLU) or act in (F.relu, F.relu_, torch.relu, torch.relu_)


def relu_after(parent, attr, conv):
    """What follows ``conv`` (= ``getattr(parent, attr)``): ``"module"`` (its own ReLU
    activation attribute), ``"functional"`` (an ``F.relu_`` in a detectron2 ResNet block's
    forward), ``"other"`` (another activation attribute) or ``"none"``."""
    act = getattr(conv, "activation", None)
    if getattr(conv, _RELU_REPLACED, False):  # removed by an earlier pass
        return "module"
    if act is not None:
        return "module" if _is_relu(act) else "other"
    if parent is not None and attr in _FUNCTIONAL_RELU_AFTER.get(type(parent).__name__, ()):
        if type(parent).__module__.startswith("detectron2.modeling.backbone"):
            return "functional"
    return "none"


def prepare_norm_sites(model):
    """Apply the per-site rules of the module docstring to ``model`` in place; returns it."""
    parents = {}
    for module in model.modules():
        for attr, child in module.named_children():
            parents[id(child)] = (module, attr)
    for conv in list(model.modules()):
        norm = getattr(conv, "norm", None)
        if not isinstance(conv, nn.Conv2d) or not isinstance(norm, nn.Module):
            continue
        if not _carries_activation(norm):
            continue
        parent, attr = parents.get(id(conv), (None, None))
        site = relu_after(parent, attr, conv)
        if site == "module":
            if norm.replace_relu:
                conv.activation = None
                setattr(conv, _RELU_REPLACED, True)
        elif site == "none":
            norm.drop_activation()
    for seq in list(model.modules()):
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        for i, name in enumerate(names[:-1]):
            norm, nxt = seq._modules[name], seq._modules[names[i + 1]]
            if (
                _carries_activation(norm)
                and norm.activation
                and norm.replace_relu
                and (isinstance(nxt, nn.ReLU))
            ):
                seq._modules[names[i + 1]] = nn.Identity()
    return model
