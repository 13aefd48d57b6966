"""A training data loader that continues where a resumed run left off.

detectron2's default sampler restarts its stream at every launch, so after ``--resume`` the
model sees different images than an uninterrupted run would. Here the sampler's stream is a
pure function of (seed, rank) and skips the ``start_iter × images-per-batch`` samples already
consumed; the real loader is built lazily at the first ``next()``, i.e. after the checkpoint
(with ``start_iter`` and the seed) has been loaded. Building it does not touch the global RNG.
With a deterministic mapper (no random augmentation) and one aspect-ratio group (or grouping
off), a resumed run sees exactly the batches of the uninterrupted run.

"""

import itertools

import torch
from torch.utils.data import Sampler

__all__ = ["ResumableTrainingSampler", "DeferredTrainLoader"]


class ResumableTrainingSampler(Sampler):
    """Infinite shuffled index stream of epochs (seeded), sharded over ranks, minus ``skip``."""

    def __init__(self, size, seed, skip=0, shuffle=True, rank=0, world_size=1):
        if size <= 0:
            raise ValueError(f"The training dataset is empty (size={size}); check DATASETS.TRAIN.")
        self._size, self._seed, self._skip = int(size), int(seed), int(skip)
        self._shuffle, self._rank, self._world_size = shuffle, rank, world_size

    def _infinite_indices(self):
        g = torch.Generator()
        g.manual_seed(self._seed)
        while True:
            if self._shuffle:
                yield from torch.randperm(self._size, generator=g).tolist()
            else:
                yield from range(self._size)

    def __iter__(self):
        stream = itertools.islice(self._infinite_indices(), self._rank, None, self._world_size)
        return itertools.islice(stream, self._skip, None)


class _DeferredIterator:
    def __init__(self, owner):
        self._owner, self._it = owner, None

    def __iter__(self):
        return self

    def __next__(self):
        if self._it is None:
            # The DataLoader iterator, created lazily inside the first next(), draws a worker
            # base seed from the global torch RNG. Undo that draw, so that a resumed run's
            # global RNG stream matches the uninterrupted run's (detectron2's transforms use
            # numpy's RNG, which is left alone).
            rng = torch.get_rng_state()
            self._it = iter(self._owner.build())
            first = next(self._it)
            torch.set_rng_state(rng)
            return first
        return next(self._it)


class DeferredTrainLoader:
    """Iterable over training batches; the real loader is built at the first ``next()``.

    ``build_fn(start_iter, seed)`` returns the real loader; ``start_iter`` and ``seed`` may be
    changed (by the trainer, after loading a checkpoint) until then.
    """

    def __init__(self, build_fn, seed, start_iter=0):
        self._build_fn = build_fn
        self.seed = int(seed)
        self.start_iter = int(start_iter)

    def build(self):
        return self._build_fn(self.start_iter, self.seed)

    def __iter__(self):
        return _DeferredIterator(self)
