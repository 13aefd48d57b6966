"""Normalization layers. One module per method; each docstring states its equations."""
from .group_norm import BatchNormWS, GroupNorm, GroupNormWS
from .sync_batch_norm import SyncBatchNorm2d

__all__ = ["GroupNorm", "GroupNormWS", "BatchNormWS", "SyncBatchNorm2d"]
try:  # the method modules (added per method)
    from .cross_iteration_batch_norm import CrossIterationBatchNorm2d  # noqa: F401

    __all__.append("CrossIterationBatchNorm2d")
except ImportError:  # pragma: no cover
    pass
try:
    from .moving_average_batch_norm import MovingAverageBatchNorm2d  # noqa: F401

    __all__.append("MovingAverageBatchNorm2d")
except ImportError:  # pragma: no cover
    pass
