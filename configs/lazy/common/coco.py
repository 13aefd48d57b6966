"""The training parts of configs/Base-RCNN-FPN.yaml as LazyConfig fields: COCO 2017 train / val
(detectron2's dataset names; the files under ``$DETECTRON2_DATASETS``, default ``datasets/``),
multi-scale training (short side 640-800, max 1333, horizontal flip), 16 images per iteration,
SGD at lr 0.02 with detectron2's default weight-decay rules, the 1x schedule (90k iterations,
x0.1 at 60k and 80k, 1000 warm-up iterations) and a checkpoint every 5000 iterations, on CUDA.
The input format follows the model's (``model.model.input_format``). The recipes change what
their YAML twin's ``_BASE_`` chain changes (:func:`single_scale_1x`); the fields are built by
training.py."""

from .training import dataloaders, multistep, sgd, trainer_settings

dataloader = dataloaders(
    train_names="coco_2017_train",
    test_names="coco_2017_val",
    min_size_train=(640, 672, 704, 736, 768, 800),  # INPUT.MIN_SIZE_TRAIN
    max_size_train=1333,
    min_size_test=800,
    max_size_test=1333,
    image_format="${model.model.input_format}",  # INPUT.FORMAT, as the model's pixel mean / std
    random_flip=True,
    total_batch_size=16,
    num_workers=4,
)
optimizer = sgd(weight_decay_norm=0.0)
lr_multiplier = multistep(steps=[60000, 80000])
train = trainer_settings(
    output_dir="output/lazy/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x",
    init_checkpoint="pretrained/R-50.pkl",
    max_iter=90000,
    checkpoint_period=5000,
    device="cuda",
    seed=-1,
)


def single_scale_1x(dataloader, optimizer, lr_multiplier):
    """The training setting of the recipes after mmdetection's (Misc/Base-RCNN-FPN-FrozenStatsBN,
    -GN-WS, -MABN.yaml and the 1x recipes on them): single-scale 800 training
    (``INPUT.MIN_SIZE_TRAIN (800,)``), every norm parameter decayed with 1e-4
    (``SOLVER.WEIGHT_DECAY_NORM``), and the 1x steps after epochs 8 and 11 of 7,500 iterations
    (``SOLVER.STEPS (60000, 82500)``)."""
    dataloader.train.mapper.augmentations[0].short_edge_length = (800,)
    optimizer.params.weight_decay_norm = 1e-4
    lr_multiplier.steps = [60000, 82500]
