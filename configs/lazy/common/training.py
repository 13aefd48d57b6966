"""The training fields of a lazy recipe, built from the values of a yacs recipe's ``DATASETS``,
``INPUT``, ``DATALOADER``, ``SOLVER`` and ``TEST`` nodes. synthetic.py and coco.py call these
with their datasets' values; the recipes change single fields afterwards (each field's comment
names the yacs key it stands for; d2norm/engine/lazy_trainer.py maps ``train`` to the trainer)."""

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


def dataloaders(
    train_names,
    test_names,
    min_size_train,
    max_size_train,
    min_size_test,
    max_size_test,
    image_format,
    random_flip,
    total_batch_size,
    num_workers,
):
    """``dataloader.train`` / ``test`` / ``evaluator`` as detectron2's yacs path builds them:
    ``DatasetMapper(cfg, is_train)`` (resize to ``INPUT.MIN_SIZE_*`` / ``MAX_SIZE_*``, sampled
    by "choice", then a horizontal flip if ``random_flip``; instance masks as polygons), the
    training set without empty images (``DATALOADER.FILTER_EMPTY_ANNOTATIONS``), and the COCO
    evaluator of boxes and masks, with pycocotools where detectron2's compiled ops are absent
    (d2norm's ``_C`` stand-in)."""
    train_augs = [
        L(T.ResizeShortestEdge)(
            short_edge_length=tuple(min_size_train), max_size=max_size_train, sample_style="choice"
        )
    ]
    if random_flip:  # INPUT.RANDOM_FLIP "horizontal"
        train_augs.append(L(T.RandomFlip)(horizontal=True))
    dataloader = OmegaConf.create()
    dataloader.train = L(build_detection_train_loader)(
        dataset=L(get_detection_dataset_dicts)(names=train_names, filter_empty=True),
        mapper=L(DatasetMapper)(
            is_train=True, augmentations=train_augs, image_format=image_format, use_instance_mask=True
        ),
        total_batch_size=total_batch_size,  # SOLVER.IMS_PER_BATCH
        num_workers=num_workers,  # DATALOADER.NUM_WORKERS
    )
    dataloader.test = L(build_detection_test_loader)(
        dataset=L(get_detection_dataset_dicts)(names=test_names, filter_empty=False),
        mapper=L(DatasetMapper)(
            is_train=False,
            augmentations=[
                L(T.ResizeShortestEdge)(
                    short_edge_length=min_size_test, max_size=max_size_test, sample_style="choice"
                )
            ],
            image_format="${...train.mapper.image_format}",
            use_instance_mask=True,
        ),
        num_workers=num_workers,
    )
    dataloader.evaluator = L(COCOEvaluator)(
        dataset_name="${..test.dataset.names}",
        tasks=("bbox", "segm"),
        output_dir="${train.output_dir}/inference",
        use_fast_impl=L(d2norm.compiled_ops_available)(),
    )
    return dataloader


def sgd(weight_decay_norm, lr=0.02, momentum=0.9, weight_decay=1e-4):
    """``optimizer``: SGD (``SOLVER.BASE_LR``, ``MOMENTUM``, ``WEIGHT_DECAY``) on d2norm's
    parameter groups, where every norm's parameters get ``weight_decay_norm``
    (``SOLVER.WEIGHT_DECAY_NORM``). For ``SOLVER.BIAS_LR_FACTOR`` / ``WEIGHT_DECAY_BIAS`` set
    ``optimizer.params.bias_lr_factor`` / ``weight_decay_bias`` (the bias lr is relative to
    ``optimizer.lr``)."""
    return L(torch.optim.SGD)(
        params=L(d2norm.lazy.param_groups)(weight_decay_norm=weight_decay_norm, base_lr="${..lr}"),
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
    )


def multistep(steps, warmup_iters=1000):
    """``lr_multiplier``: linear warm-up over ``warmup_iters`` (``SOLVER.WARMUP_ITERS``, from
    ``WARMUP_FACTOR`` 0.001), then x0.1 at each of ``steps`` (``SOLVER.STEPS``), up to
    ``train.max_iter``."""
    return L(d2norm.lazy.warmup_multistep)(
        max_iter="${train.max_iter}", steps=list(steps), warmup_iters=warmup_iters
    )


def trainer_settings(output_dir, init_checkpoint, max_iter, checkpoint_period, device, seed, eval_period=0):
    """``train``: the trainer's settings (the yacs key of each is in the comments)."""
    return OmegaConf.create(
        dict(
            output_dir=output_dir,  # OUTPUT_DIR
            init_checkpoint=init_checkpoint,  # MODEL.WEIGHTS ("": from scratch)
            max_iter=max_iter,  # SOLVER.MAX_ITER
            amp=dict(enabled=False),  # SOLVER.AMP.ENABLED
            ddp=dict(broadcast_buffers=False, find_unused_parameters=False, fp16_compression=False),
            checkpointer=dict(period=checkpoint_period, max_to_keep=None),  # SOLVER.CHECKPOINT_PERIOD
            eval_period=eval_period,  # TEST.EVAL_PERIOD (0: at the end only)
            log_period=20,
            device=device,  # MODEL.DEVICE
            seed=seed,  # SEED (-1: a random one)
            # d2norm's trainer settings (D2NORM.PREEMPT.*, D2NORM.DATA.ROOT of a yacs config)
            preempt=dict(signals=["SIGTERM", "SIGINT", "SIGUSR1"], exit_code=75),
            data_root="",  # "" -> $D2NORM_DATA or ~/.cache/d2norm/datasets
        )
    )
