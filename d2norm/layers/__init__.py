"""Normalization layers. One module per method; each docstring states its equations.

What the layers share (the protocol of norms that need their conv, the eval map) is in
:mod:`d2norm.layers.base`; which names build which layer, with which options and capabilities,
is the norm table (:mod:`d2norm.norms`).
"""

from .base import ConvFedNorm, EvalStatistics
from .batch_renorm import BatchRenorm2d
from .cross_iteration_batch_norm import CrossIterationBatchNorm2d
from .cycle_norm_list import CycleNormList
from .evonorm import EvoNormS0
from .filter_response_norm import FilterResponseNorm2d
from .frozen_statistics_batch_norm import FrozenStatisticsBatchNorm2d
from .group_norm import BatchNormWS, GroupNorm, GroupNormWS
from .moving_average_batch_norm import MovingAverageBatchNorm2d
from .sync_batch_norm import SyncBatchNorm2d

__all__ = [
    "BatchNormWS",
    "BatchRenorm2d",
    "ConvFedNorm",
    "CrossIterationBatchNorm2d",
    "CycleNormList",
    "EvalStatistics",
    "EvoNormS0",
    "FilterResponseNorm2d",
    "FrozenStatisticsBatchNorm2d",
    "GroupNorm",
    "GroupNormWS",
    "MovingAverageBatchNorm2d",
    "SyncBatchNorm2d",
]
