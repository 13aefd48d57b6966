"""The training parts of configs/synthetic/Base-Synthetic.yaml as LazyConfig fields: the
synthetic shapes splits at 128 px, SGD with ``weight_decay_norm`` for every norm, the
warm-up / step schedule, and the trainer's settings (``train``: see d2norm/engine/lazy_trainer.py
for the yacs key each field stands for). The model is in mask_rcnn_fpn.py and the recipes; the
fields are built by training.py."""

from .training import dataloaders, multistep, sgd, trainer_settings

dataloader = dataloaders(
    train_names="d2norm_shapes_train",
    test_names="d2norm_shapes_val",
    min_size_train=(128,),  # INPUT.MIN_SIZE_TRAIN
    max_size_train=128,
    min_size_test=128,
    max_size_test=128,
    image_format="BGR",
    random_flip=False,  # RANDOM_FLIP "none": a deterministic input pipeline (exact --resume)
    total_batch_size=4,
    num_workers=0,
)
optimizer = sgd(weight_decay_norm=0.0)
lr_multiplier = multistep(steps=[420, 540], warmup_iters=50)
train = trainer_settings(
    output_dir="output/lazy/synthetic/mask_rcnn_R_18_FPN_GN",
    init_checkpoint="",
    max_iter=600,
    checkpoint_period=300,
    device="cpu",
    seed=42,
)
