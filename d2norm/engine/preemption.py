"""Stopping training on a signal with a checkpoint (cluster preemption).

SLURM and Kubernetes send SIGTERM (SLURM's ``--signal`` often SIGUSR1) some time before they kill
a job; a terminal sends SIGINT. With ``D2NORM.PREEMPT.SIGNALS`` (default SIGTERM, SIGINT,
SIGUSR1) :class:`PreemptionHook`:

1. on the first signal, only records it (the handler logs one line and returns);
2. after the iteration in progress (its ``after_step``, after the LR scheduler and the periodic
   checkpointer), all processes agree whether any of them was signalled (one all-reduce of two
   integers per iteration, over gloo), so every rank stops after the same iteration;
3. rank 0 writes ``model_<iter>.pth`` like the periodic checkpointer (model with CBN history and
   MABN buffers, optimizer, scheduler, iteration, RNG states and data-stream seed), all ranks
   wait for it, and :class:`TrainingPreempted` (a ``SystemExit`` with ``D2NORM.PREEMPT.EXIT_CODE``,
   default 75) leaves ``Trainer.train`` after the writers flushed the metrics (the final
   evaluation and ``model_final`` are left to the resumed run);
4. a second signal ends the process at once (the signal's default action), without a checkpoint.

``--resume`` continues from that checkpoint exactly. Under the multi-process launchers
(:mod:`d2norm.engine.launch`) the launching process forwards the first signal to its workers
through shared memory (:func:`set_launcher_stop`), kills them on a second one, and exits with the
workers' status.
"""

import logging
import os
import signal
import threading

import torch
import torch.distributed as dist

from detectron2.engine import HookBase
from detectron2.utils import comm

__all__ = [
    "EX_TEMPFAIL",
    "TrainingPreempted",
    "PreemptionHook",
    "StopSignals",
    "parse_signals",
    "set_launcher_stop",
]

logger = logging.getLogger("d2norm")

#: sysexits.h's "temporary failure; the user is invited to retry": the default exit status.
EX_TEMPFAIL = 75

# A shared integer the launching process sets to the number of the signal it received (0: none).
_LAUNCHER_STOP = None


def set_launcher_stop(value):
    """Make workers also stop when ``value.value`` (a shared ``multiprocessing.Value``) is set."""
    global _LAUNCHER_STOP
    _LAUNCHER_STOP = value


class TrainingPreempted(SystemExit):
    """Training stopped on a signal after ``iteration``, with its checkpoint written; the exit
    status (``code``) is ``D2NORM.PREEMPT.EXIT_CODE``."""

    def __init__(self, code, iteration, signal_name, checkpoint):
        super().__init__(code)
        self.iteration = iteration
        self.signal_name = signal_name
        self.checkpoint = checkpoint


def parse_signals(names, key="D2NORM.PREEMPT.SIGNALS"):
    """``signal.Signals`` for names like ``"SIGTERM"`` / ``"TERM"`` (or signals); a clear error for
    others."""
    if isinstance(names, str):
        names = (names,)
    result = []
    for name in names:
        if isinstance(name, int):  # a signal.Signals or its number
            sig = signal.Signals(name)
        else:
            full = str(name).upper()
            sig = getattr(signal.Signals, full if full.startswith("SIG") else "SIG" + full, None)
        if sig is None or sig in (signal.SIGKILL, signal.SIGSTOP):
            raise ValueError(
                f"{key}: {name!r} is not a signal that can be caught. Fix: use names such as "
                "SIGTERM, SIGINT, SIGUSR1, SIGUSR2 (or () to turn preemption handling off)."
            )
        result.append(sig)
    return result


class StopSignals:
    """Handlers for ``signals``: the first records the signal, a second one of them ends the
    process at once by the signal's default action. ``install`` / ``uninstall`` (main thread)."""

    def __init__(self, signals):
        self.signals = list(signals)
        self.received = 0  # number of the first signal received
        self._previous = {}

    def install(self):
        if threading.current_thread() is not threading.main_thread():
            logger.warning("Preemption signals not handled: training runs outside the main thread.")
            return
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received:
            os.write(2, f"\n{name} received again: exiting now, without a checkpoint.\n".encode())
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signum
        logger.warning(
            "%s received: stopping after the iteration in progress and writing a checkpoint "
            "(send it again to exit at once, without one).",
            name,
        )


class PreemptionHook(HookBase):
    """The stop on a signal (module docstring). Place it after the LR scheduler and the periodic
    checkpointer and before evaluation; every rank must have it."""

    def __init__(self, checkpointer, signals, exit_code=EX_TEMPFAIL, before_save=None):
        self.checkpointer = checkpointer
        self.before_save = before_save  # called on every rank before rank 0 saves
        self.stop = StopSignals(signals)
        self.exit_code = int(exit_code)
        self._group = None
        self._world = 1

    def before_train(self):
        self._world = comm.get_world_size()
        if self._world > 1 and dist.get_backend() != "gloo":  # agree on CPU tensors
            self._group = dist.new_group(backend="gloo")
        self.stop.install()

    def after_train(self):
        self.stop.uninstall()

    def _requested(self):
        """``(signal number, lowest rank that received it)`` agreed by all ranks; (0, -1): none."""
        signum = self.stop.received or (_LAUNCHER_STOP.value if _LAUNCHER_STOP is not None else 0)
        if self._world == 1:
            return signum, 0 if signum else -1
        rank = comm.get_rank()
        flags = torch.tensor([signum, -rank if signum else -self._world], dtype=torch.int64)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group)
        return int(flags[0]), -int(flags[1]) if flags[0] else -1

    def after_step(self):
        signum, first_rank = self._requested()
        if not signum:
            return
        it = self.trainer.iter
        name = signal.Signals(signum).name
        where = f"rank {first_rank}" if self._world > 1 else "this process"
        logger.warning(
            "Preempted by %s (received by %s): stopping after iteration %d of %d.",
            name,
            where,
            it,
            self.trainer.max_iter,
        )
        path = os.path.join(self.checkpointer.save_dir, f"model_{it:07d}.pth")
        if self.before_save is not None:
            self.before_save()
        if comm.is_main_process():
            self.checkpointer.save(f"model_{it:07d}", iteration=it)
        if self._world > 1:
            dist.barrier(group=self._group)  # no rank exits before the checkpoint is written
        logger.warning(
            "Checkpoint %s written. Exiting with status %d; the same command with --resume "
            "continues from iteration %d.",
            path,
            self.exit_code,
            it + 1,
        )
        exc = TrainingPreempted(self.exit_code, it, name, path)
        self.trainer.preempted = exc
        raise exc
