"""The fine-tuning study: each norm where the COCO recipes put it, fine-tuned from a pretrained backbone.

An *arm* is a synthetic twin of a COCO recipe (``configs/synthetic/finetune/``: the recipe's
norm layout, freezing, weight-decay rules and ``Misc/`` base, with the synthetic data, size and
schedule), the pretrained variant it loads through ``MODEL.WEIGHTS`` (:mod:`.pretrain`) and
config overrides (:data:`ARMS`). Every point trains 8 images per iteration with the same LR,
schedule and images (per seed); P = 1 or 4 gloo processes normalize over b = 8 or 2 images each
(COCO's 2 images per GPU). Nothing depends on b but the processes: each arm runs its twin as the
recipe does (CBN's window 4 and MABN's buffer 16 are the recipes' values at every b).

The runs, records, statistics and report are the small-batch study's (:mod:`.run`,
:mod:`.records`, :mod:`.stats`, :mod:`.report`); the "norm" field of a record holds the arm.

Arms appended after the design was committed (:data:`APPENDED_ARMS`, at the end of
:data:`ARMS`) leave the records of the earlier arms valid: the study's settings id hashes the
earlier arms' configs only, as it did before the arm was added, and each appended arm's runs
carry their own id, a hash of that id and of the arm's own config (:meth:`FinetuneSettings.plan`).
"""

import dataclasses
import hashlib
import json
import os

from .settings import StudySettings, plan

__all__ = [
    "ARMS",
    "ARM_ORDER",
    "APPENDED_ARMS",
    "PRETRAIN_DEFAULTS",
    "FinetuneSettings",
    "FINETUNE_QUICK",
    "FINETUNE_FULL",
    "twin_path",
    "variant_config",
]

_CONFIG_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs"
)

#: arm -> (twin config under configs/synthetic/finetune/, pretrained variant or None = random
#: weights, config overrides)
ARMS = {
    "BN*": ("faster_rcnn_R_18_FPN_frozenbn.yaml", "BN", ()),
    "BN": ("faster_rcnn_R_18_FPN_bn_heads.yaml", "BN", ()),
    "SyncBN": ("faster_rcnn_R_18_FPN_syncbn.yaml", "BN", ()),
    "GN": ("faster_rcnn_R_18_FPN_gn.yaml", "GN", ()),
    "GN+WS": ("faster_rcnn_R_18_FPN_gn_ws.yaml", "GN+WS", ()),
    "CBN": ("faster_rcnn_R_18_FPN_cbn.yaml", "BN", ()),
    "CBN exact": ("faster_rcnn_R_18_FPN_cbn.yaml", "BN", ("D2NORM.CBN.GRAD_THROUGH_COMPENSATION", "True")),
    "MABN": ("faster_rcnn_R_18_FPN_mabn.yaml", "MABN", ()),
    "BN* random": ("faster_rcnn_R_18_FPN_frozenbn.yaml", None, ()),  # the positive control
    # appended after the design (docs/finetune_study_header.md, "Added before its runs")
    "BCN+WS": ("faster_rcnn_R_18_FPN_bcn_ws.yaml", "BCN+WS", ()),
}
ARM_ORDER = tuple(ARMS)
#: arms added after the grid's design, in the order added: their configs stay out of the study's
#: settings id (the earlier arms' run keys do not change); each has its own id (``plan``)
APPENDED_ARMS = ("BCN+WS",)
#: arms run at P = 1 only: the positive control compares pretrained with random weights at b = 8
CONTROL_ARMS = ("BN* random",)
#: the pretraining of every variant (tools/pretrain_backbone.py defaults)
PRETRAIN_DEFAULTS = dict(iters=1500, batch=64, lr=0.1)


def twin_path(name):
    return os.path.join(_CONFIG_DIR, "synthetic", "finetune", name)


def variant_config(variant):
    """The twin config that loads the pretrained ``variant`` (the first arm using it)."""
    for twin, v, _ in ARMS.values():
        if v == variant:
            return twin_path(twin)
    raise ValueError(f"No fine-tuning arm loads the pretrained variant {variant!r}.")


def _check_arms(arms):
    bad = [a for a in arms if a not in ARMS]
    if bad:
        raise ValueError(f"Unknown arm(s) {bad}. Fix: pick from {', '.join(ARMS)}.")


@dataclasses.dataclass
class FinetuneSettings(StudySettings):
    """The fine-tuning study's settings: ``norms`` holds arms (:data:`ARMS`)."""

    config: str = ""  # unused: every arm has its twin
    norms: tuple = tuple(a for a in ARM_ORDER)
    procs: tuple = (1, 4)
    seeds: tuple = (0, 1, 2, 3, 4)
    curve_fracs: tuple = (0.5, 0.8, 0.9)
    skip_redundant: bool = True  # SyncBN in one process is BN at 8 images, exactly
    pretrain: tuple = tuple(sorted(PRETRAIN_DEFAULTS.items()))  # (key, value) pairs of PretrainSettings
    weights: tuple = ()  # (variant, path) pairs set by the runner once the checkpoints exist

    def __post_init__(self):
        super().__post_init__()
        _check_arms(self.norms)
        self.pretrain = tuple(tuple(kv) for kv in self.pretrain)
        self.weights = tuple(tuple(kv) for kv in self.weights)

    # -- the hooks of the study's runner (see StudySettings) --
    def check_norms(self):
        _check_arms(self.norms)

    def pretrain_settings(self, variant):
        from .pretrain import PretrainSettings

        return PretrainSettings(
            variant=variant,
            config=variant_config(variant),
            data_root=self.data_root,
            **dict(self.pretrain),
        )

    def variants(self):
        """The pretrained variants the arms load, in the order of :data:`ARMS` (appended arms'
        variants last)."""
        out = []
        for arm in ARM_ORDER:
            variant = ARMS[arm][1]
            if arm in self.norms and variant and variant not in out:
                out.append(variant)
        return out

    def arm_cfg(self, arm):
        """The arm's config before the run's processes, seed and output (twin + overrides)."""
        from detectron2.config import get_cfg

        from .. import add_d2norm_config

        twin, variant, opts = ARMS[arm]
        cfg = get_cfg()
        add_d2norm_config(cfg)
        cfg.merge_from_file(twin_path(twin))
        cfg.merge_from_list(list(opts) + list(self.opts))
        cfg.SOLVER.IMS_PER_BATCH = self.total_batch
        cfg.SOLVER.MAX_ITER = self.iters
        if self.data_root:
            cfg.D2NORM.DATA.ROOT = self.data_root
        weights = dict(self.weights)
        if variant is not None:
            if variant not in weights:
                raise ValueError(
                    f"Arm {arm!r} needs the pretrained {variant!r} backbone. Fix: run "
                    f"tools/pretrain_backbone.py --variant {variant} (tools/finetune_study.py does it)."
                )
            cfg.MODEL.WEIGHTS = weights[variant]
        return cfg

    def build_cfg(self, norm, procs, seed, output_dir):
        cfg = self.arm_cfg(norm)
        cfg.SEED = seed
        cfg.OUTPUT_DIR = output_dir
        cfg.freeze()
        return cfg

    def settings_id(self):
        """A hash of every arm's merged config (weights file excluded: its settings go in through
        the pretraining settings), the pretraining settings and the study version.

        It hashes every arm of the design, whichever arms ``norms`` selects, so that a run of a
        subset (``--arms``) has the key of the same run in the full grid; arms of
        :data:`APPENDED_ARMS` are left out (see :meth:`arm_settings_id`)."""
        from ..data.synthetic_shapes import HARD_VERSION

        dumps = {}
        for arm in sorted(a for a in ARM_ORDER if a not in APPENDED_ARMS):
            cfg = self.arm_cfg_unweighted(arm)
            dumps[arm] = cfg.dump()
        blob = json.dumps(
            {"cfgs": dumps, "pretrain": list(self.pretrain), "version": 1, "data": HARD_VERSION},
            sort_keys=True,
        )
        return hashlib.sha1(blob.encode()).hexdigest()[:12]

    def arm_settings_id(self, arm, sid=None):
        """The settings id of ``arm``'s runs: the study's (:meth:`settings_id`, or ``sid``), or, for
        an arm of :data:`APPENDED_ARMS`, a hash of it and of the arm's merged config."""
        sid = sid or self.settings_id()
        if arm not in APPENDED_ARMS:
            return sid
        blob = json.dumps(
            {"study": sid, "arm": arm, "cfg": self.arm_cfg_unweighted(arm).dump()}, sort_keys=True
        )
        return hashlib.sha1(blob.encode()).hexdigest()[:12]

    def arm_cfg_unweighted(self, arm):
        from .pretrain import VARIANTS

        s = dataclasses.replace(self, weights=tuple((v, "") for v in VARIANTS), data_root="")
        cfg = s.arm_cfg(arm)
        cfg.D2NORM.DATA.ROOT = ""
        return cfg

    def plan(self, sid=None):
        """The grid; the positive control (:data:`CONTROL_ARMS`) at P = 1 only; the runs of an
        appended arm carry its own settings id (:meth:`arm_settings_id`)."""
        sid = sid or self.settings_id()
        runs = plan(self, sid, skip=lambda arm, p: arm in CONTROL_ARMS and p != 1)
        ids = {arm: self.arm_settings_id(arm, sid) for arm in self.norms if arm in APPENDED_ARMS}
        for run in runs:
            run["settings_id"] = ids.get(run["norm"], sid)
        return runs


FINETUNE_QUICK = dict(
    norms=("BN*", "BN", "SyncBN"),
    procs=(1, 2),
    seeds=(0,),
    iters=20,
    curve_fracs=(0.5,),
    pretrain=(("batch", 16), ("iters", 10), ("lr", 0.05)),
    opts=("DATASETS.TEST", "('d2norm_shapes_hard_quick_val',)", "TEST.PRECISE_BN.NUM_ITER", "3"),
)
FINETUNE_FULL = dict()
