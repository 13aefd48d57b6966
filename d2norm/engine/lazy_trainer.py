"""Training from a LazyConfig (detectron2's Python configs) with d2norm's trainer.

``train_net.py --config-file x.py key=value ...`` (and ``d2norm-train``) load the ``.py`` config,
apply the ``key=value`` overrides (detectron2's ``LazyConfig.apply_overrides``; a key the config
does not have is refused, unless written ``+key=value``) and train with :class:`LazyTrainer`:
:class:`~d2norm.engine.trainer.Trainer` (CBN burn-in log, MABN warm-up, method state and RNG in
checkpoints, exact ``--resume``, the non-finite guard, preemption, ``log.txt`` with the model)
whose model, optimizer, scheduler, loaders and evaluator come from the config's fields, as in
detectron2's LazyConfig recipes:

* ``model``: instantiated, then refused by :func:`d2norm.lazy.check_prepared` unless it went
  through ``d2norm.lazy.prepared`` (``configs/lazy/common/mask_rcnn_fpn.py`` does);
* ``optimizer``: instantiated with ``optimizer.params.model`` set to the model;
* ``lr_multiplier``: a fvcore ``ParamScheduler`` (the multiplier of the optimizer's lr);
* ``dataloader.train`` / ``dataloader.test`` / ``dataloader.evaluator``; the training loader is
  rebuilt around a sampler stream that resumes where a checkpoint left off;
* ``train``: the trainer's settings. The part of a yacs config the trainer reads is
  :func:`trainer_config`'s view of these fields (:data:`TRAINER_KEYS`: ``train.max_iter`` is
  ``SOLVER.MAX_ITER``, ``train.preempt.signals`` is ``D2NORM.PREEMPT.SIGNALS``, ...). The norms'
  options are not there: they travel with the norm (``d2norm.norm("CBN", buffer_size=2)``).
"""

import copy
import logging

from omegaconf import OmegaConf

from detectron2.config import get_cfg, instantiate
from detectron2.engine import hooks

from ..config import add_d2norm_config
from ..lazy import check_prepared
from .cbn_regime import model_cbn_regime_warning
from .data import build_resumable_lazy_train_loader
from .guards import check_datasets
from .trainer import Trainer, log_model

__all__ = [
    "TRAINER_KEYS",
    "is_lazy_config",
    "load_lazy_config",
    "trainer_config",
    "check_trainable",
    "build_lazy_model",
    "lazy_test",
    "LazyTrainer",
]

logger = logging.getLogger("d2norm")

#: (key of the yacs config the trainer reads, LazyConfig key it comes from); keys the LazyConfig
#: lacks keep detectron2's / d2norm's defaults.
TRAINER_KEYS = (
    ("OUTPUT_DIR", "train.output_dir"),
    ("MODEL.DEVICE", "train.device"),
    ("MODEL.WEIGHTS", "train.init_checkpoint"),
    ("SEED", "train.seed"),
    ("SOLVER.MAX_ITER", "train.max_iter"),
    ("SOLVER.CHECKPOINT_PERIOD", "train.checkpointer.period"),
    ("SOLVER.AMP.ENABLED", "train.amp.enabled"),
    ("TEST.EVAL_PERIOD", "train.eval_period"),
    ("SOLVER.IMS_PER_BATCH", "dataloader.train.total_batch_size"),
    ("DATASETS.TRAIN", "dataloader.train.dataset.names"),
    ("DATASETS.TEST", "dataloader.test.dataset.names"),
    ("D2NORM.PREEMPT.SIGNALS", "train.preempt.signals"),
    ("D2NORM.PREEMPT.EXIT_CODE", "train.preempt.exit_code"),
    ("D2NORM.DATA.ROOT", "train.data_root"),
)
_REQUIRED = ("model", "optimizer", "lr_multiplier", "dataloader.train", "train.max_iter", "train.output_dir")
_REQUIRED_EVAL = ("model", "dataloader.test", "dataloader.evaluator", "train.output_dir")
#: ``train`` fields whose only supported value is what detectron2's DefaultTrainer does.
_FIXED = {
    "train.ddp.broadcast_buffers": False,
    "train.ddp.find_unused_parameters": False,
    "train.ddp.fp16_compression": False,
}
_MISSING = object()


def is_lazy_config(path):
    """Whether ``path`` is a LazyConfig (a ``.py`` file) rather than a yacs YAML."""
    return str(path).endswith(".py")


def _select(conf, key, default=_MISSING):
    return OmegaConf.select(conf, key, default=default)


def unknown_override_keys(conf, overrides):
    """The keys of ``key=value`` overrides that ``conf`` does not have (``+key=value`` adds a key,
    as in hydra's grammar, and is not checked)."""
    keys = [o.split("=", 1)[0].strip() for o in overrides]
    return [k for k in keys if not k.startswith(("+", "~")) and _select(conf, k) is _MISSING]


def load_lazy_config(path, overrides=()):
    """``LazyConfig.load(path)`` with ``overrides`` applied (``LazyConfig.apply_overrides``).
    Raises ``ValueError`` for an override of a key the config does not have (a typo would
    otherwise add a key nothing reads) and for a config without the fields training needs."""
    from detectron2.config import LazyConfig

    conf = LazyConfig.load(path)
    unknown = unknown_override_keys(conf, overrides)
    if unknown:
        raise ValueError(
            f"Override(s) of key(s) that {path} does not have: {unknown}. Fix: correct the key "
            "(e.g. train.max_iter=100, dataloader.train.total_batch_size=2, "
            "model.model.backbone.norm=GN), or write +key=value to add a new one."
        )
    return LazyConfig.apply_overrides(conf, list(overrides))


def check_trainable(conf, path="the LazyConfig", eval_only=False):
    """Raise ``ValueError`` naming the fields a training run (or, ``eval_only``, an evaluation)
    needs and ``conf`` lacks, or ``train`` settings the trainer does not support."""
    required = _REQUIRED_EVAL if eval_only else _REQUIRED
    missing = [k for k in required if _select(conf, k) is _MISSING]
    if missing:
        raise ValueError(
            f"{path} lacks {missing}, which {'evaluation' if eval_only else 'training'} needs. "
            "Fix: define them as detectron2's "
            "LazyConfig recipes do (model, optimizer, lr_multiplier, dataloader.train / test / "
            "evaluator, train), or import them from configs/lazy/common/coco.py (COCO) or "
            "synthetic.py; configs/lazy/synthetic/mask_rcnn_R_18_FPN_GN.py is a complete recipe."
        )
    for key, value in _FIXED.items():
        got = _select(conf, key, value)
        if got != value:
            raise ValueError(
                f"{path} sets {key}={got!r}; d2norm's trainer (detectron2's DefaultTrainer) "
                f"supports only {value!r}. Fix: remove the setting."
            )


def _names(value):
    return (value,) if isinstance(value, str) else tuple(value)


def trainer_config(conf):
    """The yacs config the trainer reads, from the LazyConfig ``conf`` (:data:`TRAINER_KEYS`):
    detectron2's and d2norm's defaults, with the values ``conf`` has. A pure function."""
    cfg = add_d2norm_config(get_cfg())
    for yacs_key, lazy_key in TRAINER_KEYS:
        value = _select(conf, lazy_key)
        if value is _MISSING or value is None:
            continue
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=True)
        if yacs_key.startswith(("DATASETS.", "D2NORM.PREEMPT.SIGNALS")):
            value = _names(value)
        node, leaf = cfg, yacs_key.split(".")
        for part in leaf[:-1]:
            node = node[part]
        node[leaf[-1]] = value
    cfg.freeze()
    return cfg


def build_lazy_model(conf):
    """``conf.model`` instantiated, checked to be prepared (:func:`d2norm.lazy.check_prepared`),
    moved to ``train.device`` and logged; warns where CBN is known to stall training."""
    model = check_prepared(instantiate(conf.model))
    model.to(_select(conf, "train.device", None) or get_cfg().MODEL.DEVICE)
    log_model(model)
    message = model_cbn_regime_warning(model, _select(conf, "train.init_checkpoint", ""))
    if message:
        logger.warning(message)
    return model


def lazy_test(conf, model):
    """Evaluate ``model`` on ``dataloader.test`` with ``dataloader.evaluator`` (detectron2's
    ``inference_on_dataset``); ``{}`` if the config has no evaluator."""
    from detectron2.evaluation import inference_on_dataset, print_csv_format

    if _select(conf, "dataloader.evaluator", None) is None:
        return {}
    results = inference_on_dataset(
        model, instantiate(conf.dataloader.test), instantiate(conf.dataloader.evaluator)
    )
    if results:
        print_csv_format(results)
    return results


class LazyTrainer(Trainer):
    """:class:`~d2norm.engine.trainer.Trainer` built from a LazyConfig (see the module docstring).

    ``self.cfg`` is :func:`trainer_config`'s view; the ``build_*`` methods and ``test`` are
    instance methods here (detectron2's trainer calls them on the instance), reading
    ``self.lazy``."""

    def __init__(self, conf):
        check_trainable(conf)
        self.lazy = conf
        super().__init__(trainer_config(conf))

    def build_model(self, cfg):
        return build_lazy_model(self.lazy)

    def build_optimizer(self, cfg, model):
        spec = copy.deepcopy(self.lazy.optimizer)
        spec.params.model = model
        return instantiate(spec)

    def build_lr_scheduler(self, cfg, optimizer):
        from detectron2.solver import LRMultiplier

        return LRMultiplier(
            optimizer, multiplier=instantiate(self.lazy.lr_multiplier), max_iter=cfg.SOLVER.MAX_ITER
        )

    def build_train_loader(self, cfg):
        check_datasets(cfg.DATASETS.TRAIN, "dataloader.train.dataset.names")
        return build_resumable_lazy_train_loader(self.lazy.dataloader.train, cfg.SEED)

    def test(self, cfg, model):
        return lazy_test(self.lazy, model)

    def build_hooks(self):
        ret = super().build_hooks()
        for h in ret:
            if isinstance(h, hooks.PeriodicCheckpointer):
                h.max_to_keep = _select(self.lazy, "train.checkpointer.max_to_keep", None)
            if isinstance(h, hooks.PeriodicWriter):  # DefaultTrainer fixes it at 20
                h._period = int(_select(self.lazy, "train.log_period", 20))
        return ret
