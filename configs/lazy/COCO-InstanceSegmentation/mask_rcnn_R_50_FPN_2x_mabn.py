"""LazyConfig of configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_2x_mabn.yaml: MABN
everywhere (buffer 16, 100 warm-up iterations, momentum 0.98), nothing frozen, maskrcnn-benchmark's
BGR input (the MABN authors' R50-wc.pth).
Trains as the twin on COCO (8 GPUs x 2 images: ``train_net.py --num-gpus 8 --config-file`` this file);
the training fields are configs/lazy/common/coco.py's, with the twin's changes below."""

import d2norm

from ..common.coco import dataloader, lr_multiplier, optimizer, single_scale_1x, train
from ..common.mask_rcnn_fpn import four_conv_one_fc_heads, model, set_norm

four_conv_one_fc_heads(model)
model.model.backbone.bottom_up.freeze_at = 0
model.model.pixel_mean = [102.9801, 115.9465, 122.7717]
set_norm(model, d2norm.norm("MABN", buffer_size=16, warmup_iters=100, momentum=0.98))

single_scale_1x(dataloader, optimizer, lr_multiplier)
# maskrcnn-benchmark: biases (MABN's beta included) at twice the lr, without weight decay
optimizer.params.bias_lr_factor = 2.0  # SOLVER.BIAS_LR_FACTOR
optimizer.params.weight_decay_bias = 0.0  # SOLVER.WEIGHT_DECAY_BIAS
lr_multiplier.steps = [120000, 160000]  # 2x
train.max_iter = 180000
train.init_checkpoint = "pretrained/R50-wc.pth"
train.output_dir = "output/lazy/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_2x_mabn"
