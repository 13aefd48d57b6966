"""Per-level norms in RetinaNet's head.

RetinaNet's head applies each norm once per FPN level. In a ``RetinaNetHead`` every norm whose
training advances state (the table's ``running_stats``: CBN, MABN, BN+WS, BRN, SyncBN) becomes a
:class:`~d2norm.layers.CycleNormList` of one copy per level (shared γ, β; CBN copies bound to
the shared conv), and the ``nn.SyncBatchNorm`` layers detectron2 builds there for "SyncBN"
become d2norm's ``SyncBatchNorm2d``.
"""

from torch import nn

from detectron2.layers.batch_norm import CycleBatchNormList

from ..layers import CycleNormList, SyncBatchNorm2d
from ..norms import spec_of
from .link import join, split

__all__ = ["per_level_norms_in_retinanet_heads"]


def _advances_per_call(module):
    spec = spec_of(module)
    return spec is not None and spec.running_stats


def per_level_norms_in_retinanet_heads(model):
    """Apply the module docstring to every ``RetinaNetHead`` of ``model``, in place."""
    try:
        from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
    except ImportError:  # pragma: no cover - detectron2 without RetinaNet
        return
    for head_path, head in list(model.named_modules()):
        if not isinstance(head, RetinaNetHead):
            continue
        levels = getattr(head, "_num_features", None)
        for path, m in list(head.named_modules()):
            if not path:
                continue
            parent_path, name = split(path)
            parent = head.get_submodule(parent_path) if parent_path else head
            if isinstance(m, CycleBatchNormList):  # detectron2's "SyncBN" here is torch's layer
                for i, bn in enumerate(m):
                    if type(bn) is nn.SyncBatchNorm:
                        m[i] = _as_d2norm_sync_bn(bn)
            elif _advances_per_call(m) and not isinstance(parent, (CycleNormList, CycleBatchNormList)):
                if not isinstance(levels, int):
                    raise ValueError(
                        f"{type(m).__name__} at '{join(head_path, path)}' is applied once per "
                        "feature level by the RetinaNet head, but the head does not say how many "
                        'levels it has (_num_features). Fix: use a norm without state ("GN", '
                        '"GN+WS") in the head.'
                    )
                setattr(parent, name, CycleNormList.of(m, levels))


def _as_d2norm_sync_bn(bn):
    new = SyncBatchNorm2d(
        bn.num_features,
        eps=bn.eps,
        momentum=bn.momentum,
        affine=bn.affine,
        track_running_stats=bn.track_running_stats,
    )
    new.load_state_dict(bn.state_dict())
    return new.to(bn.running_mean.device if bn.running_mean is not None else None)
