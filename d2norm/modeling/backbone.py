"""A ResNet-FPN whose FPN may stop before res5 (the studies' backbone).

detectron2's ``build_resnet_fpn_backbone`` always pools its extra level from "p5", so an FPN over
res2-res4 cannot be built with it. ``build_study_resnet_fpn_backbone`` (``MODEL.BACKBONE.NAME``)
is the same construction (``build_resnet_backbone`` + ``FPN`` + ``LastLevelMaxPool``) with the
max-pooled level taken from the last FPN output, whatever its stage: over res2-res4 the outputs
are p2-p4 and p5 = max-pool(p4). With res5 in ``MODEL.FPN.IN_FEATURES`` it builds the same model
as detectron2's function. The study drops res5 of ResNet-18: at 96 px it sees 3x3 pixels but holds
3/4 of the weights, which every process all-reduces at every iteration.

Registered on ``import d2norm``, so every config that names it (the study and fine-tuning twin
configs) runs with ``train_net.py`` like any other.
"""

from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool
from detectron2.modeling.backbone.resnet import build_resnet_backbone

__all__ = ["build_study_resnet_fpn_backbone"]


@BACKBONE_REGISTRY.register()
def build_study_resnet_fpn_backbone(cfg, input_shape):
    bottom_up = build_resnet_backbone(cfg, input_shape)
    in_features = list(cfg.MODEL.FPN.IN_FEATURES)
    missing = [f for f in in_features if f not in bottom_up.output_shape()]
    if missing:
        raise ValueError(
            f"MODEL.FPN.IN_FEATURES {in_features} names {missing}, which the ResNet does not output "
            f"(MODEL.RESNETS.OUT_FEATURES {list(cfg.MODEL.RESNETS.OUT_FEATURES)}). Fix: make the two "
            "lists name the same stages."
        )
    top_block = LastLevelMaxPool()
    last = max(in_features, key=lambda f: bottom_up.output_shape()[f].stride)
    top_block.in_feature = "p" + last[len("res") :]
    return FPN(
        bottom_up=bottom_up,
        in_features=in_features,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=top_block,
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
