"""The training parts of configs/synthetic/Base-Synthetic.yaml as LazyConfig fields: the
synthetic shapes splits at 128 px, SGD with ``weight_decay_norm`` for every norm, the
warm-up / step schedule, and the trainer's settings (``train``: see d2norm/engine/lazy_trainer.py
for the yacs key each field stands for). The model is in mask_rcnn_fpn.py and the recipes."""

import torch
from omegaconf import OmegaConf

import d2norm
import d2norm.lazy

from detectron2.config import LazyCall as L
from detectron2.data import (
    DatasetMapper,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.data import transforms as T
from detectron2.evaluation import COCOEvaluator

dataloader = OmegaConf.create()
dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names="d2norm_shapes_train", filter_empty=True),
    mapper=L(DatasetMapper)(
        is_train=True,
        # INPUT.MIN_SIZE_TRAIN (128,), MAX_SIZE_TRAIN 128; RANDOM_FLIP "none" (exact --resume)
        augmentations=[
            L(T.ResizeShortestEdge)(short_edge_length=(128,), max_size=128, sample_style="choice")
        ],
        image_format="BGR",
        use_instance_mask=True,
    ),
    total_batch_size=4,  # SOLVER.IMS_PER_BATCH
    num_workers=0,
)
dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="d2norm_shapes_val", filter_empty=False),
    mapper=L(DatasetMapper)(
        is_train=False,
        augmentations=[L(T.ResizeShortestEdge)(short_edge_length=128, max_size=128)],
        image_format="${...train.mapper.image_format}",
    ),
    num_workers=0,
)
# pycocotools' evaluation where detectron2's compiled ops are absent (d2norm's _C stand-in)
dataloader.evaluator = L(COCOEvaluator)(
    dataset_name="${..test.dataset.names}",
    tasks=("bbox", "segm"),
    output_dir="${train.output_dir}/inference",
    use_fast_impl=L(d2norm.compiled_ops_available)(),
)

optimizer = L(torch.optim.SGD)(
    params=L(d2norm.lazy.param_groups)(weight_decay_norm=0.0),  # SOLVER.WEIGHT_DECAY_NORM
    lr=0.02,
    momentum=0.9,
    weight_decay=1e-4,
)
lr_multiplier = L(d2norm.lazy.warmup_multistep)(
    max_iter="${train.max_iter}", steps=[420, 540], warmup_iters=50
)

train = OmegaConf.create(
    dict(
        output_dir="output/lazy/synthetic/mask_rcnn_R_18_FPN_GN",
        init_checkpoint="",  # MODEL.WEIGHTS: from scratch
        max_iter=600,
        amp=dict(enabled=False),
        ddp=dict(broadcast_buffers=False, find_unused_parameters=False, fp16_compression=False),
        checkpointer=dict(period=300, max_to_keep=None),
        eval_period=0,  # evaluation at the end only
        log_period=20,
        device="cpu",
        seed=42,
        # d2norm's trainer settings (D2NORM.PREEMPT.*, D2NORM.DATA.ROOT of a yacs config)
        preempt=dict(signals=["SIGTERM", "SIGINT", "SIGUSR1"], exit_code=75),
        data_root="",  # "" -> $D2NORM_DATA or ~/.cache/d2norm/datasets
    )
)
