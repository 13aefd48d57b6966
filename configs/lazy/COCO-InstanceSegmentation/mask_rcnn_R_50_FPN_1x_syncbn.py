"""LazyConfig of configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_syncbn.yaml:
FrozenStatsBN backbone, SyncBN in FPN and heads (4conv1fc box head), torchvision R-50 input.
Trains as the twin on COCO (4 GPUs x 4 images: ``train_net.py --num-gpus 4 --config-file`` this file);
the training fields are configs/lazy/common/coco.py's, with the twin's changes below."""

from ..common.coco import dataloader, lr_multiplier, optimizer, single_scale_1x, train
from ..common.mask_rcnn_fpn import four_conv_one_fc_heads, model, set_norm, torchvision_input

torchvision_input(model)
four_conv_one_fc_heads(model)
set_norm(model, "FrozenStatsBN", fpn=False, box_head=False, mask_head=False)
set_norm(model, "SyncBN", backbone=False)

single_scale_1x(dataloader, optimizer, lr_multiplier)
train.init_checkpoint = "pretrained/resnet50-19c8e357.pth"
train.output_dir = "output/lazy/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_syncbn"
