"""``Trainer``: detectron2's ``DefaultTrainer`` with d2norm's model building and method state.

- ``build_model``: d2norm's norm names and the model-preparation pass (:mod:`d2norm.modeling`).
- ``build_optimizer``: detectron2's, with ``SOLVER.WEIGHT_DECAY_NORM`` for every norm (:mod:`d2norm.optim`).
- Checkpoints (atomic, :mod:`d2norm.checkpoint`) also hold the RNG states and the data-stream
  seed, and the training data resumes where it stopped, so ``--resume`` continues a run exactly
  (on CPU: identical losses). CBN history and MABN buffers are module buffers, hence in the
  model's state_dict.
- A hook logs the end of CBN burn-in.
- COCO evaluation uses pycocotools when detectron2's compiled ops are absent.
- A step with a non-finite loss is skipped and undone, norm statistics included
  (:mod:`d2norm.engine.guards`).
"""
import contextlib
import logging
import os
import random
import weakref

import numpy as np
import torch
from detectron2.data import build_detection_train_loader, get_detection_dataset_dicts
from detectron2.data import DatasetMapper
from detectron2.engine import DefaultTrainer, HookBase
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm

from ..checkpoint import D2NormCheckpointer
from ..compat import compiled_ops_available
from ..data.resumable_loader import DeferredTrainLoader, ResumableTrainingSampler
from ..modeling import build_model
from ..optim import build_optimizer
from .guards import NonFiniteGuard, check_datasets, guarded_run_step

__all__ = ["Trainer", "RNGState", "NormMilestoneHook"]

logger = logging.getLogger("d2norm")


class RNGState:
    """Checkpointable global RNG state (python, numpy, torch) and the data-stream seed."""

    def __init__(self, loader=None):
        self._loader = loader

    def state_dict(self):
        # only tensors and plain Python values, so torch.load(weights_only=True) can read it
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state = {
            "python": random.getstate(),
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        if self._loader is not None:
            state["data_seed"] = self._loader.seed
        return state

    def load_state_dict(self, state):
        random.setstate(state["python"])
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        if self._loader is not None and "data_seed" in state:
            self._loader.seed = int(state["data_seed"])


class NormMilestoneHook(HookBase):
    """Logs once when every CBN layer has left burn-in (a host-side check, no device sync)."""

    def __init__(self, model):
        self._cbn = [m for m in model.modules() if hasattr(m, "in_burnin")]
        self._cbn_done = True

    def before_train(self):  # after a checkpoint was loaded
        self._cbn_done = not self._cbn or not any(m.in_burnin for m in self._cbn)

    def after_step(self):
        it = self.trainer.iter
        if not self._cbn_done and not any(m.in_burnin for m in self._cbn):
            self._cbn_done = True
            logger.info("CBN burn-in ended at iteration %d: %d layers now use cross-iteration "
                        "statistics.", it, len(self._cbn))
            self.trainer.storage.put_scalar("cbn_burnin_ended_iter", it, smoothing_hint=False)


@contextlib.contextmanager
def _ddp_for_cpu_models():
    """While DefaultTrainer.__init__ runs, wrap CPU models in DDP without ``device_ids``.

    detectron2's ``create_ddp_model`` passes ``device_ids=[local_rank]``, which torch rejects
    for a CPU module (multi-process CPU training with gloo, see ``launch_cpu``). Only CPU models
    are affected; ``broadcast_buffers=False`` (per-process norm statistics) is kept."""
    from detectron2.engine import defaults

    original = defaults.create_ddp_model

    def create_ddp_model(model, **kwargs):
        if comm.get_world_size() > 1 and all(p.device.type == "cpu" for p in model.parameters()):
            kwargs.setdefault("device_ids", None)
        return original(model, **kwargs)

    defaults.create_ddp_model = create_ddp_model
    try:
        yield
    finally:
        defaults.create_ddp_model = original


class Trainer(DefaultTrainer):
    """DefaultTrainer for d2norm models (see module docstring)."""

    def __init__(self, cfg):
        with _ddp_for_cpu_models():
            super().__init__(cfg)

    @classmethod
    def build_model(cls, cfg):
        model = build_model(cfg)
        logging.getLogger(__name__).info("Model:\n%s", model)
        return model

    @classmethod
    def build_optimizer(cls, cfg, model):
        # every d2norm norm's gamma/beta get SOLVER.WEIGHT_DECAY_NORM, like BN and GN (optim.py)
        return build_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg):
        check_datasets(cfg.DATASETS.TRAIN, "DATASETS.TRAIN")
        dataset = get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN,
            filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
            min_keypoints=0,
            proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
        )
        batch_per_rank = cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size()
        seed = cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()

        def build(start_iter, seed):
            sampler = ResumableTrainingSampler(
                len(dataset), seed, skip=start_iter * batch_per_rank,
                rank=comm.get_rank(), world_size=comm.get_world_size(),
            )
            return build_detection_train_loader(
                cfg, mapper=DatasetMapper(cfg, True), dataset=dataset, sampler=sampler
            )

        return DeferredTrainLoader(build, seed)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        check_datasets([dataset_name], "DATASETS.TEST")
        return super().build_test_loader(cfg, dataset_name)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
        return COCOEvaluator(
            dataset_name, tasks=tasks, output_dir=output_folder,
            use_fast_impl=compiled_ops_available(),
        )

    def build_hooks(self):
        # Replace the default checkpointer before the hooks that use it are created.
        loader = self._trainer.data_loader
        self._rng_state = RNGState(loader if isinstance(loader, DeferredTrainLoader) else None)
        self.checkpointer = D2NormCheckpointer(
            self._trainer.model,
            self.cfg.OUTPUT_DIR,
            trainer=weakref.proxy(self),
            rng=self._rng_state,
        )
        hooks = super().build_hooks()
        hooks.insert(2, NormMilestoneHook(self._trainer.model))
        return hooks

    # detectron2 v0.6's DefaultTrainer leaves the optimizer out of its checkpoints (later versions
    # add it as "_trainer"); add it where the installed version does not.
    _BASE_SAVES_OPTIMIZER = "state_dict" in DefaultTrainer.__dict__

    def state_dict(self):
        ret = super().state_dict()
        if not self._BASE_SAVES_OPTIMIZER:
            ret["_trainer"] = self._trainer.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if not self._BASE_SAVES_OPTIMIZER and "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])

    def run_step(self):
        # detectron2's step, except that a non-finite step is skipped and undone (guards.py)
        self._trainer.iter = self.iter
        if getattr(self, "_nonfinite_guard", None) is None:
            self._nonfinite_guard = NonFiniteGuard(self._trainer.model)
        guarded_run_step(self._trainer, self._nonfinite_guard)

    def resume_or_load(self, resume=True):
        super().resume_or_load(resume=resume)
        loader = self._trainer.data_loader
        if isinstance(loader, DeferredTrainLoader):
            loader.start_iter = self.start_iter
