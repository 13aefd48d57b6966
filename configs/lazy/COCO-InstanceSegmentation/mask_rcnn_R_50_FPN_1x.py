"""LazyConfig of configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml: BN*
(detectron2's FrozenBN) backbone, no norm in FPN and heads, MSRA R-50 (``pretrained/R-50.pkl``).
Trains as the twin on COCO (8 GPUs x 2 images: ``train_net.py --num-gpus 8 --config-file`` this file);
the training fields are configs/lazy/common/coco.py's."""

from ..common.coco import dataloader, lr_multiplier, optimizer, train  # noqa: F401
from ..common.mask_rcnn_fpn import model  # noqa: F401
