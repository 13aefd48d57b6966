"""Normalization layers. One module per method; each docstring states its equations."""

from .batch_channel_norm import BatchChannelNorm2d, BatchChannelNormWS, BCNBatchNorm2d
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
    "BatchChannelNorm2d",
    "BatchChannelNormWS",
    "BCNBatchNorm2d",
    "BatchNormWS",
    "BatchRenorm2d",
    "CrossIterationBatchNorm2d",
    "CycleNormList",
    "EvoNormS0",
    "FilterResponseNorm2d",
    "FrozenStatisticsBatchNorm2d",
    "GroupNorm",
    "GroupNormWS",
    "MovingAverageBatchNorm2d",
    "NORM_TYPES",
    "SyncBatchNorm2d",
]

#: d2norm's normalization layer classes (a new norm adds its class here: the optimizer's
#: WEIGHT_DECAY_NORM rule and the preparation pass read this tuple).
NORM_TYPES = (
    BatchChannelNorm2d,
    BCNBatchNorm2d,
    BatchNormWS,
    BatchRenorm2d,
    CrossIterationBatchNorm2d,
    EvoNormS0,
    FilterResponseNorm2d,
    GroupNorm,
    GroupNormWS,
    MovingAverageBatchNorm2d,
    SyncBatchNorm2d,
)
