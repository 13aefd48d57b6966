#!/usr/bin/env python
"""Train / evaluate a detectron2 model with d2norm's normalization methods.

python train_net.py --config-file configs/synthetic/mask_rcnn_R_18_FPN_GN.yaml
python train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/model_final.pth
python train_net.py --config-file ... --num-gpus 8 --resume
python train_net.py --config-file ... --num-gpus 2 MODEL.DEVICE cpu   # 2 CPU processes (gloo)

A LazyConfig (.py) takes detectron2's key=value overrides (d2norm/engine/lazy_trainer.py):
python train_net.py --config-file configs/lazy/synthetic/mask_rcnn_R_18_FPN_CBN.py train.max_iter=300
python train_net.py --config-file ... --eval-only train.init_checkpoint=output/.../model_final.pth
"""

import d2norm  # noqa: F401  (must precede detectron2.layers: registers norms / the _C stand-in)
from d2norm.engine.launch import cli

if __name__ == "__main__":
    cli()
