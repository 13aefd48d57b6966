"""LazyConfig of configs/synthetic/mask_rcnn_R_18_FPN_MABN.yaml: MABN everywhere, buffer 4."""

import d2norm

from ..common.mask_rcnn_fpn import set_norm
from .mask_rcnn_R_18_FPN_GN import dataloader, lr_multiplier, model, optimizer, train  # noqa: F401

set_norm(model, d2norm.norm("MABN", buffer_size=4))
train.output_dir = "output/lazy/synthetic/mask_rcnn_R_18_FPN_MABN"
