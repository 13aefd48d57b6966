#!/usr/bin/env python
"""Train / evaluate a detectron2 model with d2norm's normalization methods.

python train_net.py --config-file configs/synthetic/mask_rcnn_R_18_FPN_GN.yaml
python train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/model_final.pth
python train_net.py --config-file ... --num-gpus 8 --resume
python train_net.py --config-file ... --num-gpus 2 MODEL.DEVICE cpu   # 2 CPU processes (gloo)
"""

import d2norm  # noqa: F401  (must precede detectron2.layers: registers norms / the _C stand-in)
from d2norm.engine.launch import cli

if __name__ == "__main__":
    cli()
