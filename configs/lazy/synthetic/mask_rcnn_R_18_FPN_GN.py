"""LazyConfig of configs/synthetic/mask_rcnn_R_18_FPN_GN.yaml: Mask R-CNN R-18-FPN, GN everywhere,
on the synthetic shapes, from scratch. Trains with ``train_net.py --config-file`` this file."""

from detectron2.layers import ShapeSpec

from ..common.mask_rcnn_fpn import model, set_norm
from ..common.synthetic import dataloader, lr_multiplier, optimizer, train  # noqa: F401

_m = model.model
_m.backbone.bottom_up.stages.depth = 18
del _m.backbone.bottom_up.stages.stride_in_1x1  # BasicBlock has no 1x1 conv
_m.backbone.bottom_up.freeze_at = 0
_m.backbone.out_channels = 64
_m.proposal_generator.head.in_channels = 64
_m.proposal_generator.anchor_generator.sizes = [[8], [16], [32], [64], [128]]
_m.proposal_generator.batch_size_per_image = 128
_m.proposal_generator.pre_nms_topk = (500, 300)
_m.proposal_generator.post_nms_topk = (200, 100)
_m.roi_heads.num_classes = 3
_m.roi_heads.batch_size_per_image = 64
_m.roi_heads.box_head.input_shape = ShapeSpec(channels=64, height=7, width=7)
_m.roi_heads.box_head.conv_dims = [64, 64, 64, 64]
_m.roi_heads.box_head.fc_dims = [256]
_m.roi_heads.box_predictor.input_shape = ShapeSpec(channels=256)
_m.roi_heads.mask_head.input_shape = ShapeSpec(channels=64, width=14, height=14)
_m.roi_heads.mask_head.conv_dims = [64, 64, 64]
_m.pixel_std = [57.375, 57.120, 58.395]
_m.roi_heads.box_predictor.test_topk_per_image = 20  # TEST.DETECTIONS_PER_IMAGE
set_norm(model, "GN")
