"""LazyConfig of configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_gn_ws.yaml:
GN+WS everywhere with the WS authors' convention (their pretrained R-50-GN-WS.pth).
Trains as the twin on COCO (8 GPUs x 2 images: ``train_net.py --num-gpus 8 --config-file`` this file);
the training fields are configs/lazy/common/coco.py's, with the twin's changes below."""

import d2norm

from ..common.coco import dataloader, lr_multiplier, optimizer, single_scale_1x, train
from ..common.mask_rcnn_fpn import four_conv_one_fc_heads, model, set_norm, torchvision_input

torchvision_input(model)
four_conv_one_fc_heads(model)
set_norm(model, d2norm.norm("GN+WS", num_groups=32, ws_convention="std_plus_eps", ws_eps=1e-5))

single_scale_1x(dataloader, optimizer, lr_multiplier)
train.init_checkpoint = "pretrained/R-50-GN-WS.pth"
train.output_dir = "output/lazy/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_gn_ws"
