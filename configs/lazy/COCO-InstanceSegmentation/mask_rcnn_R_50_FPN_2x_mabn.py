"""LazyConfig of configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_2x_mabn.yaml (model): MABN
everywhere (buffer 16, 100 warm-up iterations, momentum 0.98), nothing frozen, maskrcnn-benchmark's
BGR input (the MABN authors' R50-wc.pth)."""

import d2norm

from ..common.mask_rcnn_fpn import four_conv_one_fc_heads, model, set_norm

four_conv_one_fc_heads(model)
model.model.backbone.bottom_up.freeze_at = 0
model.model.pixel_mean = [102.9801, 115.9465, 122.7717]
set_norm(model, d2norm.norm("MABN", buffer_size=16, warmup_iters=100, momentum=0.98))
