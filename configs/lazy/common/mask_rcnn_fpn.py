"""Mask R-CNN with a ResNet-FPN backbone as a LazyConfig (detectron2's components, LazyCall),
with the defaults of detectron2's yacs config (``Base-RCNN-FPN.yaml``). The model is wrapped in
``d2norm.lazy.prepared``: the model-preparation pass ``d2norm.build_model`` runs for yacs
configs (WS / weight centralization, CBN links, FRN / EvoNorm activation sites, frozen norms).

Norms: set ``model.model.backbone.bottom_up.stem.norm``, ``...bottom_up.stages.norm``,
``model.model.backbone.norm``, ``model.model.roi_heads.box_head.conv_norm`` and
``...mask_head.conv_norm`` to a name (``"GN"``) or ``d2norm.norm("CBN", buffer_size=4)``;
:func:`set_norm` sets all of them.
"""

import d2norm.lazy

from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.backbone import FPN, BasicStem, ResNet
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.meta_arch import GeneralizedRCNN
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.proposal_generator import RPN, StandardRPNHead
from detectron2.modeling.roi_heads import (
    FastRCNNConvFCHead,
    FastRCNNOutputLayers,
    MaskRCNNConvUpsampleHead,
    StandardROIHeads,
)

_FEATURES = ["p2", "p3", "p4", "p5", "p6"]


def _pooler(size):
    """RoIAlignV2 over P2-P5 (``POOLER_TYPE``, ``POOLER_SAMPLING_RATIO 0``)."""
    return L(ROIPooler)(
        output_size=size,
        scales=(1.0 / 4, 1.0 / 8, 1.0 / 16, 1.0 / 32),
        sampling_ratio=0,
        pooler_type="ROIAlignV2",
    )


model = L(d2norm.lazy.prepared)(
    model=L(GeneralizedRCNN)(
        backbone=L(FPN)(
            bottom_up=L(ResNet)(
                stem=L(BasicStem)(in_channels=3, out_channels=64, norm="FrozenBN"),
                stages=L(ResNet.make_default_stages)(depth=50, stride_in_1x1=True, norm="FrozenBN"),
                out_features=["res2", "res3", "res4", "res5"],
                freeze_at=2,
            ),
            in_features=["res2", "res3", "res4", "res5"],
            out_channels=256,
            norm="",
            top_block=L(LastLevelMaxPool)(),
        ),
        proposal_generator=L(RPN)(
            in_features=_FEATURES,
            head=L(StandardRPNHead)(in_channels=256, num_anchors=3),
            anchor_generator=L(DefaultAnchorGenerator)(
                sizes=[[32], [64], [128], [256], [512]],
                aspect_ratios=[0.5, 1.0, 2.0],
                strides=[4, 8, 16, 32, 64],
                offset=0.0,
            ),
            anchor_matcher=L(Matcher)(
                thresholds=[0.3, 0.7], labels=[0, -1, 1], allow_low_quality_matches=True
            ),
            box2box_transform=L(Box2BoxTransform)(weights=[1.0, 1.0, 1.0, 1.0]),
            batch_size_per_image=256,
            positive_fraction=0.5,
            pre_nms_topk=(2000, 1000),
            post_nms_topk=(1000, 1000),
            nms_thresh=0.7,
        ),
        roi_heads=L(StandardROIHeads)(
            num_classes=80,
            batch_size_per_image=512,
            positive_fraction=0.25,
            proposal_matcher=L(Matcher)(thresholds=[0.5], labels=[0, 1], allow_low_quality_matches=False),
            box_in_features=["p2", "p3", "p4", "p5"],
            box_pooler=_pooler(7),
            box_head=L(FastRCNNConvFCHead)(
                input_shape=ShapeSpec(channels=256, height=7, width=7),
                conv_dims=[],
                fc_dims=[1024, 1024],
                conv_norm="",
            ),
            box_predictor=L(FastRCNNOutputLayers)(
                input_shape=ShapeSpec(channels=1024),
                test_score_thresh=0.05,
                box2box_transform=L(Box2BoxTransform)(weights=(10, 10, 5, 5)),
                num_classes="${..num_classes}",
            ),
            mask_in_features=["p2", "p3", "p4", "p5"],
            mask_pooler=_pooler(14),
            mask_head=L(MaskRCNNConvUpsampleHead)(
                input_shape=ShapeSpec(channels=256, width=14, height=14),
                num_classes="${..num_classes}",
                conv_dims=[256, 256, 256, 256, 256],
                conv_norm="",
            ),
        ),
        pixel_mean=[103.530, 116.280, 123.675],
        pixel_std=[1.0, 1.0, 1.0],
        input_format="BGR",
    )
)


def set_norm(model, norm, backbone=True, fpn=True, box_head=True, mask_head=True):
    """Set ``norm`` (a name or ``d2norm.norm(...)``) at every norm site of ``model`` (this file's
    ``model``), as ``MODEL.{RESNETS,FPN,ROI_BOX_HEAD,ROI_MASK_HEAD}.NORM`` do in a yacs config."""
    m = model.model
    if backbone:
        m.backbone.bottom_up.stem.norm = norm
        m.backbone.bottom_up.stages.norm = norm
    if fpn:
        m.backbone.norm = norm
    if box_head:
        m.roi_heads.box_head.conv_norm = norm
    if mask_head:
        m.roi_heads.mask_head.conv_norm = norm


def four_conv_one_fc_heads(model):
    """The box head of the norm recipes (``NUM_CONV 4``, ``NUM_FC 1``: mmdetection's
    ``ConvFCBBoxHead`` with 4 shared convs, 1 fc)."""
    model.model.roi_heads.box_head.conv_dims = [256, 256, 256, 256]
    model.model.roi_heads.box_head.fc_dims = [1024]


def torchvision_input(model):
    """RGB input with torchvision's ImageNet mean / std and the stride in the 3x3 conv: what
    torchvision-layout backbones (``pretrained/resnet50-19c8e357.pth``, ...) were trained with."""
    model.model.pixel_mean = [123.675, 116.280, 103.530]
    model.model.pixel_std = [58.395, 57.120, 57.375]
    model.model.input_format = "RGB"
    model.model.backbone.bottom_up.stages.stride_in_1x1 = False
