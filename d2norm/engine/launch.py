"""The body of ``train_net.py``: config setup and the train / eval-only entry point."""
import logging
import os

from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, default_setup
from detectron2.evaluation import verify_results
from detectron2.utils import comm

from ..checkpoint import D2NormCheckpointer
from ..config import add_d2norm_config
from ..data.synthetic_shapes import register_synthetic_datasets
from .trainer import Trainer

__all__ = ["setup", "main", "parse_args"]


def parse_args(argv=None):
    return default_argument_parser().parse_args(argv)


def setup(args):
    """Build the config from ``--config-file`` and ``opts`` (with the D2NORM node)."""
    cfg = get_cfg()
    add_d2norm_config(cfg)
    if not args.config_file:
        raise SystemExit("--config-file is required, e.g. configs/synthetic/mask_rcnn_R_18_FPN_GN.yaml")
    if not os.path.isfile(args.config_file):
        raise SystemExit(
            f"Config file not found: {args.config_file!r}. Fix: pass an existing YAML, e.g. "
            "configs/synthetic/mask_rcnn_R_18_FPN_GN.yaml"
        )
    try:
        cfg.merge_from_file(args.config_file)
        cfg.merge_from_list(args.opts)
    except (KeyError, ValueError, AssertionError) as e:
        raise SystemExit(
            f"Invalid configuration ({args.config_file} + {args.opts}): {e}. Fix: correct the key or "
            "value; d2norm's own options live under D2NORM.* (see d2norm/config.py)."
        ) from None
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def _register_datasets(cfg):
    names = [n for n in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST) if n.startswith("d2norm_shapes")]
    if names:
        register_synthetic_datasets(cfg.D2NORM.DATA.ROOT or None, names)


def main(args):
    cfg = setup(args)
    _register_datasets(cfg)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        D2NormCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()
