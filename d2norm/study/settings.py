"""What a study runs: the grid (norms x processes x seeds), the schedule and the per-norm rules.

Every point trains with the same total batch (``total_batch`` images per iteration), learning
rate, schedule and images; what varies is the number of processes P and so the images per
process b = total_batch / P that each norm layer normalizes over. Per-norm rules that depend on
b (applied by :func:`apply_norm_rules`):

* CBN: window (``D2NORM.CBN.BUFFER_SIZE``, current iteration included) = simulated / b, burn-in
  (plain BN) = the LR warm-up. The official detection configs use a window of 4 at 2 images per
  GPU, i.e. 8 images, which is what simulated = 8 gives at b = 2.
* MABN: buffer (``D2NORM.MABN.BUFFER_SIZE``) = simulated / b, the MABN paper's rule "buffer =
  simulated batch / real batch" (its detection code: 32 / 2); warm-up = the LR warm-up.
* BRN (where the installed d2norm has it): the r_max / d_max ramps start after the LR warm-up
  and end at 50% / 30% of the schedule (the paper's 5k -> 40k / 25k steps, scaled); the running
  mean / std update at BN's rate (0.1), not the paper's 0.01, which over a 300-iteration
  from-scratch schedule corrects toward statistics of weights ~100 iterations old.
* other norms: nothing depends on b.

``simulated`` defaults to ``total_batch``: CBN and MABN aim at the statistics of the batch that
SyncBN (the control) and BN at b = total_batch (the reference) normalize over.
"""

import dataclasses
import hashlib
import json
import os

__all__ = [
    "StudySettings",
    "NORM_SITES",
    "NORM_RULES",
    "available_norms",
    "check_norms",
    "schedule",
    "apply_norm_rules",
    "build_cfg",
    "plan",
    "settings_id",
    "settings_from_args",
    "QUICK",
    "FULL",
]

#: the config keys that receive the study's norm (every normalized call site of the model)
NORM_SITES = ("RESNETS", "FPN", "ROI_BOX_HEAD", "ROI_MASK_HEAD")
STUDY_VERSION = 3


@dataclasses.dataclass
class StudySettings:
    """Everything that defines a study's runs (see the module docstring)."""

    config: str  # the study's base YAML
    norms: tuple = ("BN", "SyncBN", "GN", "GN+WS", "BCN+WS", "CBN", "MABN", "BRN", "FRN", "EvoNorm-S0")
    procs: tuple = (8, 4, 1)  # P, processes per run; b = total_batch / P
    seeds: tuple = (0, 1, 2)
    iters: int = 300
    total_batch: int = 8
    simulated_batch: int = 0  # CBN / MABN target; 0 = total_batch
    warmup_frac: float = 0.1
    step_fracs: tuple = (0.75, 0.9)  # LR x0.1 at these fractions of the schedule
    curve_fracs: tuple = (0.6, 0.8, 0.9)  # extra evaluations (convergence), 1.0 always
    curve_seeds: tuple = (0,)  # seeds whose runs get the extra evaluations
    tail_evals: int = 3  # the last K checkpoints, every iters // 30, evaluated in every run
    precise_images: int = 160  # training images for the re-estimated-statistics evaluation
    skip_redundant: bool = True  # SyncBN at P = 1 is BN at b = total_batch exactly
    threads: int = 1  # torch threads per process
    opts: tuple = ()  # config overrides (KEY VALUE ...)
    data_root: str = ""

    def __post_init__(self):
        for name in ("norms", "procs", "seeds", "step_fracs", "curve_fracs", "curve_seeds", "opts"):
            setattr(self, name, tuple(getattr(self, name)))
        if not self.simulated_batch:
            self.simulated_batch = self.total_batch
        bad = [p for p in self.procs if p < 1 or self.total_batch % p]
        if bad:
            raise ValueError(
                f"processes {bad} do not divide the total batch {self.total_batch}. Fix: "
                f"use divisors of {self.total_batch} (--procs) or change --total-batch."
            )
        if self.iters < 1 or self.threads < 1 or self.tail_evals < 1 or self.precise_images < 1:
            raise ValueError("--iters, --threads, --tail-evals and --precise-images must be >= 1")
        if len(self.opts) % 2:
            raise ValueError(f"config overrides come in KEY VALUE pairs, got {list(self.opts)}")

    def per_proc(self, procs):
        return self.total_batch // procs

    # What the runner (d2norm.study.run) asks of a study; another study (e.g. the fine-tuning
    # study, d2norm.study.finetune) overrides these four.
    def check_norms(self):
        check_norms(self.norms)

    def build_cfg(self, norm, procs, seed, output_dir):
        return build_cfg(self, norm, procs, seed, output_dir)

    def settings_id(self):
        return settings_id(self)

    def plan(self, sid=None):
        return plan(self, sid)

    def tail_iters(self):
        """The iterations of the last ``tail_evals`` checkpoints (every ``iters // 30``)."""
        step = max(1, self.iters // 30)
        return tuple(sorted({max(1, self.iters - j * step) for j in range(self.tail_evals)}))


# quick: the machinery end to end on the 2 extreme points, for tests and a first look
QUICK = dict(
    norms=("BN", "SyncBN", "GN"),
    procs=(2, 1),
    seeds=(0,),
    iters=30,
    curve_fracs=(0.5,),
    opts=("DATASETS.TEST", "('d2norm_shapes_hard_quick_val',)"),
)
FULL = dict()


def settings_from_args(parser, cls, args, preset, **kw):
    """``cls(**kw)`` with a study command line's common flags (``--total-batch``, ``--threads``,
    ``--data-root``, the config overrides after the preset's); a ``ValueError`` becomes the
    parser's error message (exit status 2)."""
    try:
        return cls(
            total_batch=args.total_batch,
            threads=args.threads,
            opts=tuple(preset.get("opts", ())) + tuple(args.opts),
            data_root=args.data_root,
            **kw,
        )
    except ValueError as e:
        parser.error(str(e))


def available_norms():
    """Norm names a study can train: detectron2's "BN" and d2norm's trainable names."""
    import d2norm

    return ("BN",) + tuple(n for n in d2norm.NORMS if n not in ("BN*", "FrozenBN"))


def check_norms(norms):
    valid = available_norms()
    bad = [n for n in norms if n not in valid]
    if bad:
        raise ValueError(
            f"Unknown norm(s) {bad} for the study. Valid names in this d2norm: "
            f"{', '.join(valid)}. Fix: pick from them (names added by a newer d2norm "
            "become available when it is installed)."
        )


def schedule(s):
    """(STEPS, WARMUP_ITERS) of the settings' schedule."""
    steps = tuple(sorted({int(round(s.iters * f)) for f in s.step_fracs}))
    steps = tuple(x for x in steps if 0 < x < s.iters)
    return steps, max(1, int(round(s.iters * s.warmup_frac)))


def _cbn(cfg, s, b, warmup):
    cfg.D2NORM.CBN.BUFFER_SIZE = max(1, s.simulated_batch // b)
    cfg.D2NORM.CBN.BURNIN_ITERS = warmup


def _mabn(cfg, s, b, warmup):
    cfg.D2NORM.MABN.BUFFER_SIZE = max(1, s.simulated_batch // b)
    cfg.D2NORM.MABN.WARMUP_ITERS = warmup


#: BRN's running-statistic update rate in the study (see ``_brn``)
BRN_STUDY_MOMENTUM = 0.1


def _brn(cfg, s, b, warmup):
    if "BRN" in cfg.D2NORM:
        cfg.D2NORM.BRN.RAMP_START_ITER = warmup
        cfg.D2NORM.BRN.R_MAX_END_ITER = max(warmup + 1, int(s.iters * 0.5))
        cfg.D2NORM.BRN.D_MAX_END_ITER = max(warmup + 1, int(s.iters * 0.3))
        # BN's update rate of the running statistics (torch's 0.1): with the paper's 0.01 the
        # running mean / std average over ~100 of the 300 iterations of weights trained from
        # scratch, and BRN corrects toward (and evaluates with) statistics of weights that are gone
        cfg.D2NORM.BRN.MOMENTUM = BRN_STUDY_MOMENTUM


#: norm name -> rule(cfg, settings, b, warmup) setting its b-dependent options
NORM_RULES = {"CBN": _cbn, "MABN": _mabn, "BRN": _brn}


def apply_norm_rules(cfg, s, norm, b):
    for site in NORM_SITES:
        cfg.MODEL[site].NORM = norm
    rule = NORM_RULES.get(norm)
    if rule is not None:
        rule(cfg, s, b, schedule(s)[1])


def _base_cfg(s):
    from d2norm import add_d2norm_config

    from detectron2.config import get_cfg

    if not os.path.isfile(s.config):
        raise FileNotFoundError(
            f"Study config not found: {s.config!r}. Fix: pass --config "
            "configs/synthetic/study/Base-Study.yaml (relative to the repository)."
        )
    cfg = get_cfg()
    add_d2norm_config(cfg)
    cfg.merge_from_file(s.config)
    cfg.merge_from_list(list(s.opts))
    steps, warmup = schedule(s)
    cfg.SOLVER.IMS_PER_BATCH = s.total_batch
    cfg.SOLVER.MAX_ITER = s.iters
    cfg.SOLVER.STEPS = steps
    cfg.SOLVER.WARMUP_ITERS = warmup
    if s.data_root:
        cfg.D2NORM.DATA.ROOT = s.data_root
    return cfg


def build_cfg(s, norm, procs, seed, output_dir):
    """The frozen config of one run."""
    cfg = _base_cfg(s)
    apply_norm_rules(cfg, s, norm, s.per_proc(procs))
    cfg.SEED = seed
    cfg.OUTPUT_DIR = output_dir
    cfg.freeze()
    return cfg


#: ``cfg.D2NORM`` option nodes added after the study's runs were recorded (norms added later):
#: hashed only when set away from their defaults, so the recorded runs keep their settings id
LATER_OPTION_NODES = ("BCN",)
#: ``cfg.D2NORM`` nodes that never change what a run computes (when a run stops on a signal, not
#: what it trains): never hashed
RESULT_NEUTRAL_NODES = ("PREEMPT",)


def _drop_default_later_nodes(cfg):
    from detectron2.config import CfgNode

    from ..config import add_d2norm_config

    defaults = add_d2norm_config(CfgNode()).D2NORM
    for key in LATER_OPTION_NODES:
        if key in cfg.D2NORM and cfg.D2NORM[key] == defaults[key]:
            cfg.D2NORM.pop(key)
    for key in RESULT_NEUTRAL_NODES:
        cfg.D2NORM.pop(key, None)


def settings_id(s):
    """A hash of everything but (norm, P, seed) that changes a run's result: the merged config
    (all its _BASE_ files and overrides), the schedule, batch sizes, the study version and the
    version of the hard synthetic generator."""
    cfg = _base_cfg(s)
    cfg.D2NORM.DATA.ROOT = ""
    _drop_default_later_nodes(cfg)
    from ..data.synthetic_shapes import HARD_VERSION

    blob = json.dumps(
        {"cfg": cfg.dump(), "sim": s.simulated_batch, "version": STUDY_VERSION, "data": HARD_VERSION},
        sort_keys=True,
    )
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def plan(s, sid=None, skip=None):
    """The study's runs, as dicts with the run-key fields (see :func:`records.run_key`);
    ``skip(norm, P)`` True leaves a point out (besides SyncBN at P = 1 with ``skip_redundant``)."""
    s.check_norms()
    sid = sid or s.settings_id()
    out = []
    for seed in s.seeds:
        for norm in s.norms:
            for p in s.procs:
                if s.skip_redundant and norm == "SyncBN" and p == 1 or skip is not None and skip(norm, p):
                    continue
                out.append(
                    dict(
                        norm=norm, procs=p, per_proc=s.per_proc(p), seed=seed, iters=s.iters, settings_id=sid
                    )
                )
    return out
