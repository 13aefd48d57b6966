"""The trainer's data loader and evaluator, following detectron2's config keys.

:func:`build_resumable_train_loader` builds what detectron2's ``build_detection_train_loader(cfg)``
builds (dataset filtered by ``DATALOADER.FILTER_EMPTY_ANNOTATIONS`` and, with
``MODEL.KEYPOINT_ON``, ``MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE``; the sampler named by
``DATALOADER.SAMPLER_TRAIN``), with a sampler stream that resumes where a checkpoint left off
(:mod:`d2norm.data.resumable_loader`):

* ``TrainingSampler``: :class:`~d2norm.data.resumable_loader.ResumableTrainingSampler`.
* ``RepeatFactorTrainingSampler`` (``DATALOADER.REPEAT_THRESHOLD``, ``REPEAT_SQRT`` where the
  installed detectron2 has it) and ``RandomSubsetTrainingSampler``
  (``DATALOADER.RANDOM_SUBSET_RATIO``): detectron2's sampler, seeded with the checkpointed data
  seed, minus the samples already consumed.
* any other sampler the installed detectron2 knows (e.g. ``WeightedTrainingSampler``): built by
  detectron2 from the config, minus the samples already consumed; its seed is detectron2's, so a
  resumed run sees other images than an uninterrupted one (logged).

Exact resume also needs ``DATALOADER.NUM_WORKERS 0`` or a deterministic mapper: with workers, the
skipped stream is split among them differently from the uninterrupted run.

:func:`build_evaluator` picks the evaluator by the dataset's ``evaluator_type`` as detectron2's
``tools/train_net.py`` does; the COCO evaluator uses pycocotools when detectron2's compiled ops are
absent.
"""

import itertools
import logging
import os

from torch.utils.data import Sampler

from ..compat import compiled_ops_available
from ..data.resumable_loader import DeferredTrainLoader, ResumableTrainingSampler

__all__ = [
    "build_resumable_train_loader",
    "build_resumable_lazy_train_loader",
    "build_evaluator",
    "SkippingSampler",
]

logger = logging.getLogger("d2norm")


class SkippingSampler(Sampler):
    """``sampler``'s index stream without its first ``skip`` indices (those already trained on)."""

    def __init__(self, sampler, skip=0):
        self.sampler, self.skip = sampler, int(skip)

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.skip, None)


def _train_dataset(cfg):
    from detectron2.data import get_detection_dataset_dicts

    return get_detection_dataset_dicts(
        cfg.DATASETS.TRAIN,
        filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        min_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0,
        proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
    )


def build_sampler(cfg, dataset, seed, skip, rank, world_size):
    """The training sampler named by ``cfg.DATALOADER.SAMPLER_TRAIN`` (see the module docstring)."""
    from detectron2.data import build_detection_train_loader
    from detectron2.data.samplers import RandomSubsetTrainingSampler, RepeatFactorTrainingSampler

    name = cfg.DATALOADER.SAMPLER_TRAIN
    if name == "TrainingSampler":
        return ResumableTrainingSampler(len(dataset), seed, skip=skip, rank=rank, world_size=world_size)
    if name == "RepeatFactorTrainingSampler":
        sqrt = {"sqrt": cfg.DATALOADER.REPEAT_SQRT} if "REPEAT_SQRT" in cfg.DATALOADER else {}
        factors = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
            dataset, cfg.DATALOADER.REPEAT_THRESHOLD, **sqrt
        )
        return SkippingSampler(RepeatFactorTrainingSampler(factors, seed=seed), skip)
    if name == "RandomSubsetTrainingSampler":
        sampler = RandomSubsetTrainingSampler(
            len(dataset), cfg.DATALOADER.RANDOM_SUBSET_RATIO, seed_shuffle=seed, seed_subset=seed
        )
        return SkippingSampler(sampler, skip)
    # another sampler of the installed detectron2; unknown names raise detectron2's ValueError
    sampler = build_detection_train_loader.from_config(cfg, dataset=dataset)["sampler"]
    if skip:
        logger.warning(
            "DATALOADER.SAMPLER_TRAIN %r is seeded by detectron2, not by the checkpoint: "
            "the resumed run skips the samples already seen in a new random order.",
            name,
        )
    return SkippingSampler(sampler, skip)


def _deferred(total_batch_size, seed, build):
    """A :class:`DeferredTrainLoader` calling ``build(seed, skip, rank, world_size)`` with the
    number of samples this process already consumed (``skip``); ``seed`` < 0: a shared random
    seed."""
    from detectron2.utils import comm

    rank, world = comm.get_rank(), comm.get_world_size()
    batch_per_rank = total_batch_size // world
    seed = seed if seed >= 0 else comm.shared_random_seed()
    return DeferredTrainLoader(lambda start_iter, s: build(s, start_iter * batch_per_rank, rank, world), seed)


def build_resumable_train_loader(cfg, mapper=None):
    """detectron2's training loader for ``cfg``, built at the first ``next()`` so that the
    checkpoint's start iteration and data seed apply (a :class:`DeferredTrainLoader`)."""
    from detectron2.data import DatasetMapper, build_detection_train_loader

    dataset = _train_dataset(cfg)

    def build(seed, skip, rank, world):
        sampler = build_sampler(cfg, dataset, seed, skip, rank, world)
        return build_detection_train_loader(
            cfg, mapper=mapper or DatasetMapper(cfg, True), dataset=dataset, sampler=sampler
        )

    return _deferred(cfg.SOLVER.IMS_PER_BATCH, cfg.SEED, build)


def build_resumable_lazy_train_loader(spec, seed):
    """The training loader a LazyConfig's ``dataloader.train`` describes (e.g.
    ``L(build_detection_train_loader)(dataset=..., mapper=..., total_batch_size=...)``), resumable
    as :func:`build_resumable_train_loader`: the dataset is instantiated once, the loader at the
    first ``next()`` with a :class:`ResumableTrainingSampler` (or the config's own ``sampler``,
    minus the samples already consumed). ``seed``: ``train.seed`` (< 0: a shared random seed)."""
    from detectron2.config import instantiate
    from detectron2.utils.registry import locate

    dataset = instantiate(spec.dataset)
    target = spec._target_ if not isinstance(spec._target_, str) else locate(spec._target_)

    def build(seed, skip, rank, world):
        if spec.get("sampler", None) is None:
            sampler = ResumableTrainingSampler(len(dataset), seed, skip=skip, rank=rank, world_size=world)
        else:
            if skip:
                logger.warning(
                    "dataloader.train.sampler is seeded by its own arguments, not by the checkpoint: "
                    "the resumed run skips the samples already seen in its new stream."
                )
            sampler = SkippingSampler(instantiate(spec.sampler), skip)
        kwargs = {k: instantiate(v) for k, v in spec.items() if k not in ("_target_", "dataset", "sampler")}
        return target(dataset=dataset, sampler=sampler, **kwargs)

    return _deferred(spec.total_batch_size, seed, build)


def build_evaluator(cfg, dataset_name, output_folder=None):
    """The evaluator(s) for ``dataset_name``'s ``evaluator_type`` (detectron2's tools/train_net.py)."""
    from detectron2 import evaluation as ev
    from detectron2.data import MetadataCatalog

    output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
    kind = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
    evaluators = []
    if kind in ("sem_seg", "coco_panoptic_seg"):
        evaluators.append(ev.SemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder))
    if kind in ("coco", "coco_panoptic_seg"):
        tasks = (
            ("bbox",)
            + (("segm",) if cfg.MODEL.MASK_ON else ())
            + (("keypoints",) if cfg.MODEL.KEYPOINT_ON else ())
        )
        evaluators.append(
            ev.COCOEvaluator(
                dataset_name, tasks=tasks, output_dir=output_folder, use_fast_impl=compiled_ops_available()
            )
        )
    if kind == "coco_panoptic_seg":
        evaluators.append(ev.COCOPanopticEvaluator(dataset_name, output_folder))
    if kind == "cityscapes_instance":
        return ev.CityscapesInstanceEvaluator(dataset_name)
    if kind == "cityscapes_sem_seg":
        return ev.CityscapesSemSegEvaluator(dataset_name)
    if kind == "pascal_voc":
        return ev.PascalVOCDetectionEvaluator(dataset_name)
    if kind == "lvis":
        return ev.LVISEvaluator(dataset_name, output_dir=output_folder)
    if not evaluators:
        raise NotImplementedError(
            f"No evaluator for dataset {dataset_name!r} with evaluator_type {kind!r} (DATASETS.TEST). "
            "Fix: register the dataset with an evaluator_type detectron2 evaluates ('coco', "
            "'lvis', 'pascal_voc', 'sem_seg', 'coco_panoptic_seg', 'cityscapes_*'; "
            "register_coco_instances sets 'coco'), or override Trainer.build_evaluator."
        )
    return evaluators[0] if len(evaluators) == 1 else ev.DatasetEvaluators(evaluators)
