"""``add_d2norm_config(cfg)``: the ``cfg.D2NORM`` node holding every method's options.

The norms' sub-nodes (``D2NORM.GN``, ``D2NORM.CBN``, ...) and their defaults are declared
once, in the norm table (:data:`d2norm.norms.CONFIG_SECTIONS`, with what each key means).
"""

import copy

from detectron2.config import CfgNode as CN

from .norms import CONFIG_SECTIONS

__all__ = ["add_d2norm_config"]


def add_d2norm_config(cfg):
    """Add d2norm's options to a detectron2 config (idempotent)."""
    if "D2NORM" in cfg:
        return cfg
    cfg.D2NORM = CN()
    for section, values in CONFIG_SECTIONS.items():
        cfg.D2NORM[section] = CN(copy.deepcopy(values))
    # Preemption (d2norm/engine/preemption.py): on the first of SIGNALS during training, every
    # process finishes the iteration in progress, they agree on it, rank 0 writes the checkpoint
    # model_<iter>.pth (what --resume continues from, exactly), metrics are flushed and the
    # program exits with EXIT_CODE (75, EX_TEMPFAIL of sysexits.h: "try again"; what to requeue
    # on). A second signal ends the process at once, without a checkpoint. SIGNALS () = off.
    cfg.D2NORM.PREEMPT = CN()
    cfg.D2NORM.PREEMPT.SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")
    cfg.D2NORM.PREEMPT.EXIT_CODE = 75
    # Embedded synthetic dataset ("d2norm_shapes_{train,val}").
    cfg.D2NORM.DATA = CN()
    cfg.D2NORM.DATA.ROOT = ""  # "" -> $D2NORM_DATA or ~/.cache/d2norm/datasets
    return cfg
