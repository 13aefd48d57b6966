"""Normalization layers. One module per method; each docstring states its equations."""
from .cross_iteration_batch_norm import CrossIterationBatchNorm2d
from .frozen_statistics_batch_norm import FrozenStatisticsBatchNorm2d
from .group_norm import BatchNormWS, GroupNorm, GroupNormWS
from .moving_average_batch_norm import MovingAverageBatchNorm2d
from .sync_batch_norm import SyncBatchNorm2d

__all__ = [
    "BatchNormWS",
    "CrossIterationBatchNorm2d",
    "FrozenStatisticsBatchNorm2d",
    "GroupNorm",
    "GroupNormWS",
    "MovingAverageBatchNorm2d",
    "SyncBatchNorm2d",
]
