"""LazyConfig of configs/synthetic/mask_rcnn_R_18_FPN_GN_WS.yaml: GN+WS everywhere."""

from ..common.mask_rcnn_fpn import set_norm
from .mask_rcnn_R_18_FPN_GN import dataloader, lr_multiplier, model, optimizer, train  # noqa: F401

set_norm(model, "GN+WS")
train.output_dir = "output/lazy/synthetic/mask_rcnn_R_18_FPN_GN_WS"
