"""LazyConfig of configs/synthetic/mask_rcnn_R_18_FPN_GN_WS.yaml (model): GN+WS everywhere."""

from ..common.mask_rcnn_fpn import set_norm
from .mask_rcnn_R_18_FPN_GN import model

set_norm(model, "GN+WS")
