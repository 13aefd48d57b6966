"""LazyConfig of configs/synthetic/mask_rcnn_R_18_FPN_CBN.yaml: CBN in backbone and FPN
(window 2, 50 burn-in iterations), BN in the RoI heads."""

import d2norm

from ..common.mask_rcnn_fpn import set_norm
from .mask_rcnn_R_18_FPN_GN import dataloader, lr_multiplier, model, optimizer, train  # noqa: F401

set_norm(model, d2norm.norm("CBN", buffer_size=2, burnin=50), box_head=False, mask_head=False)
set_norm(model, "BN", backbone=False, fpn=False)
train.output_dir = "output/lazy/synthetic/mask_rcnn_R_18_FPN_CBN"
