"""``Trainer``: detectron2's ``DefaultTrainer`` with d2norm's model building and method state.

- ``build_model``: d2norm's norm names and the model-preparation pass (:mod:`d2norm.modeling`).
- ``build_optimizer``: detectron2's, with ``SOLVER.WEIGHT_DECAY_NORM`` for every norm (:mod:`d2norm.optim`).
- Checkpoints (atomic, :mod:`d2norm.checkpoint`) also hold the RNG states (of every process)
  and the data-stream seed, and the training data resumes where it stopped, so ``--resume``
  continues a run exactly (on CPU: identical losses). CBN history and MABN buffers are module
  buffers, hence in the model's state_dict.
- A hook logs the end of CBN burn-in.
- COCO evaluation uses pycocotools when detectron2's compiled ops are absent.
- A step with a non-finite loss is skipped and undone, norm statistics included
  (:mod:`d2norm.engine.guards`).
- A signal (``D2NORM.PREEMPT.SIGNALS``) stops training after the iteration in progress with a
  checkpoint and exit status ``D2NORM.PREEMPT.EXIT_CODE`` (:mod:`d2norm.engine.preemption`).
"""

import logging
import random
import weakref

import numpy as np
import torch

from detectron2.engine import DefaultTrainer, HookBase, TrainerBase, hooks
from detectron2.utils import comm

from ..checkpoint import D2NormCheckpointer
from ..data.resumable_loader import DeferredTrainLoader
from ..modeling import build_model
from ..optim import build_optimizer
from ..patches import ddp_for_cpu_models
from .cbn_regime import warn_cbn_regime
from .data import build_evaluator, build_resumable_train_loader
from .guards import NonFiniteGuard, check_datasets, guarded_run_step
from .preemption import PreemptionHook, parse_signals

__all__ = ["Trainer", "RNGState", "RNGGatherHook", "NormMilestoneHook", "log_model"]

logger = logging.getLogger("d2norm")


def log_model(model):
    """Log the model's printout, as detectron2's ``DefaultTrainer.build_model`` does."""
    logging.getLogger(__name__).info("Model:\n%s", model)
    return model


class RNGState:
    """Checkpointable global RNG state (python, numpy, torch) and the data-stream seed.

    With several processes each has its own RNG state (its images draw other proposals) and its
    own norm buffers (CBN history, MABN buffers, BN running statistics: DDP does not broadcast
    them), but only rank 0 writes checkpoints. :meth:`gather` (collective; called on every rank
    by :class:`RNGGatherHook` and by the preemption stop before a checkpoint is written) collects
    every rank's RNG state and model buffers into rank 0's checkpoint, and on resume each rank
    takes its own, so that a multi-process run also continues exactly."""

    def __init__(self, loader=None, iteration=None, model=None):
        self._loader = loader
        self._iteration = iteration  # callable: the trainer's iteration
        self._model = model
        self._gathered = None  # (iteration, [state of rank r])

    @staticmethod
    def _rng():
        # only tensors and plain Python values, so torch.load(weights_only=True) can read it
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state = {
            "python": random.getstate(),
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def gather(self):
        """Collect every rank's RNG state and model buffers (all ranks call it, at the iteration
        of the checkpoint)."""
        if comm.get_world_size() > 1:
            own = {"rng": self._rng()}
            if self._model is not None:
                own["buffers"] = {k: v.detach().cpu().clone() for k, v in self._model.named_buffers()}
            self._gathered = (self._iteration(), comm.all_gather(own))

    def state_dict(self):
        state = self._rng()
        if self._gathered is not None and self._gathered[0] == self._iteration():
            state["ranks"] = self._gathered[1]
        if self._loader is not None:
            state["data_seed"] = self._loader.seed
        return state

    def load_state_dict(self, state):
        # called after the model was loaded (fvcore loads checkpointables after the model)
        world, rank = comm.get_world_size(), comm.get_rank()
        rng = state
        if world > 1 and len(state.get("ranks", ())) == world:
            rng = state["ranks"][rank]["rng"]
            if rank > 0 and self._model is not None and "buffers" in state["ranks"][rank]:
                buffers = dict(self._model.named_buffers())
                with torch.no_grad():
                    for k, v in state["ranks"][rank]["buffers"].items():
                        if k in buffers and buffers[k].shape == v.shape:
                            buffers[k].copy_(v)
        elif world > 1:
            logger.warning(
                "The checkpoint holds the RNG state and norm buffers of %s, not of each of the %d "
                "processes: the run continues, but not exactly as it would have without the stop.",
                f"{len(state['ranks'])} processes" if "ranks" in state else "one process",
                world,
            )
        random.setstate(rng["python"])
        kind, keys, pos, has_gauss, cached = rng["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        if self._loader is not None and "data_seed" in state:
            self._loader.seed = int(state["data_seed"])


class RNGGatherHook(HookBase):
    """On every rank, before each periodic checkpoint (``SOLVER.CHECKPOINT_PERIOD``, the last
    iteration): :meth:`RNGState.gather`. Place it before the checkpointer."""

    def __init__(self, rng_state, period):
        self._rng, self._period = rng_state, period

    def after_step(self):
        it = self.trainer.iter
        if (it + 1) % self._period == 0 or it >= self.trainer.max_iter - 1:
            self._rng.gather()


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
            logger.info(
                "CBN burn-in ended at iteration %d: %d layers now use cross-iteration statistics.",
                it,
                len(self._cbn),
            )
            self.trainer.storage.put_scalar("cbn_burnin_ended_iter", it, smoothing_hint=False)


class Trainer(DefaultTrainer):
    """DefaultTrainer for d2norm models (see module docstring)."""

    def __init__(self, cfg):
        warn_cbn_regime(cfg)  # one warning where CBN is known to stall training (cbn_regime.py)
        with ddp_for_cpu_models():  # d2norm.patches: CPU models in multi-process runs
            super().__init__(cfg)

    @classmethod
    def build_model(cls, cfg):
        return log_model(build_model(cfg))

    @classmethod
    def build_optimizer(cls, cfg, model):
        # every d2norm norm's gamma/beta get SOLVER.WEIGHT_DECAY_NORM, like BN and GN (optim.py)
        return build_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg):
        """detectron2's training loader for ``cfg`` (``DATALOADER.SAMPLER_TRAIN``, keypoint
        filtering, ...), resumable: see :func:`d2norm.engine.data.build_resumable_train_loader`."""
        check_datasets(cfg.DATASETS.TRAIN, "DATASETS.TRAIN")
        return build_resumable_train_loader(cfg)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        check_datasets([dataset_name], "DATASETS.TEST")
        return super().build_test_loader(cfg, dataset_name)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """The evaluator for the dataset's ``evaluator_type``, as detectron2's
        ``tools/train_net.py`` picks it (:func:`d2norm.engine.data.build_evaluator`)."""
        return build_evaluator(cfg, dataset_name, output_folder)

    def build_hooks(self):
        # Replace the default checkpointer before the hooks that use it are created.
        loader = self._trainer.data_loader
        self._rng_state = RNGState(
            loader if isinstance(loader, DeferredTrainLoader) else None,
            iteration=lambda: self.iter,
            model=self._trainer.model,
        )
        self.checkpointer = D2NormCheckpointer(
            self._trainer.model,
            self.cfg.OUTPUT_DIR,
            trainer=weakref.proxy(self),
            rng=self._rng_state,
        )
        ret = super().build_hooks()
        ret.insert(2, NormMilestoneHook(self._trainer.model))
        if comm.get_world_size() > 1:  # every rank's RNG state into rank 0's checkpoints
            ret.insert(3, RNGGatherHook(self._rng_state, self.cfg.SOLVER.CHECKPOINT_PERIOD))
        signals = parse_signals(self.cfg.D2NORM.PREEMPT.SIGNALS)
        if signals:  # after the scheduler and periodic checkpointer, before evaluation
            at = next((i for i, h in enumerate(ret) if isinstance(h, hooks.EvalHook)), len(ret))
            preempt = PreemptionHook(
                self.checkpointer,
                signals,
                self.cfg.D2NORM.PREEMPT.EXIT_CODE,
                before_save=self._rng_state.gather,
            )
            ret.insert(at, preempt)
        return ret

    #: The :class:`~d2norm.engine.preemption.TrainingPreempted` that stopped training, if any.
    preempted = None

    def after_train(self):
        if self.preempted is None:
            return super().after_train()
        # Stopped on a signal: flush the writers; no final checkpoint or evaluation.
        self.storage.iter = self.iter
        for h in self._hooks:
            if not isinstance(h, (hooks.EvalHook, hooks.PeriodicCheckpointer)):
                h.after_train()

    # detectron2 v0.6's DefaultTrainer leaves the optimizer out of its checkpoints (later versions
    # add it as "_trainer"); add it where the installed version does not.
    _BASE_SAVES_OPTIMIZER = "state_dict" in DefaultTrainer.__dict__

    def state_dict(self):
        ret = super().state_dict()
        if not self._BASE_SAVES_OPTIMIZER:
            ret["_trainer"] = self._trainer.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        if "_trainer" not in state_dict:
            # A checkpoint written without the optimizer state (e.g. by detectron2 v0.6's own
            # DefaultTrainer): resume the iteration and hooks; the optimizer starts fresh.
            logger.warning(
                "The checkpoint has no optimizer state ('_trainer'): resuming the "
                "iteration count and hooks with a fresh optimizer state."
            )
            TrainerBase.load_state_dict(self, state_dict)
            return
        super().load_state_dict(state_dict)
        if not self._BASE_SAVES_OPTIMIZER:
            self._trainer.load_state_dict(state_dict["_trainer"])

    def run_step(self):
        # detectron2's step, except that a non-finite step is skipped and undone (guards.py)
        self._trainer.iter = self.iter
        if getattr(self, "_nonfinite_guard", None) is None:
            self._nonfinite_guard = NonFiniteGuard(self._trainer.model)
        guarded_run_step(self._trainer, self._nonfinite_guard, after_backward=self.after_backward)

    def after_backward(self):
        """Run the ``after_backward`` of every hook that has one (detectron2 after v0.6 defines
        it on every hook; its ``DefaultTrainer`` calls only the inner trainer's, which has none)."""
        for h in self._hooks:
            fn = getattr(h, "after_backward", None)
            if fn is not None:
                fn()

    def resume_or_load(self, resume=True):
        super().resume_or_load(resume=resume)
        loader = self._trainer.data_loader
        if isinstance(loader, DeferredTrainLoader):
            loader.start_iter = self.start_iter
