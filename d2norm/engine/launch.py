"""The body of ``train_net.py``: config setup (a yacs YAML, or a LazyConfig ``.py`` with
``key=value`` overrides: :mod:`d2norm.engine.lazy_trainer`), the train / eval-only entry point, and
``launch`` (detectron2's, plus multi-process CPU training with gloo, and the launching process's
part of the stop on a signal: :mod:`d2norm.engine.preemption`)."""

import contextlib
import logging
import multiprocessing
import os
import signal
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, default_setup
from detectron2.evaluation import verify_results
from detectron2.utils import comm

from ..checkpoint import D2NormCheckpointer
from ..config import add_d2norm_config
from ..data.synthetic_shapes import register_datasets
from ..patches import local_process_group
from .lazy_trainer import (
    LazyTrainer,
    build_lazy_model,
    check_trainable,
    is_lazy_config,
    lazy_test,
    load_lazy_config,
    trainer_config,
)
from .preemption import TrainingPreempted, parse_signals, set_launcher_stop
from .trainer import Trainer

__all__ = [
    "setup",
    "setup_lazy",
    "main",
    "lazy_main",
    "parse_args",
    "launch",
    "launch_cpu",
    "config_device",
    "config_stop_signals",
    "cli",
    "setup_d2norm_logger",
]

logger = logging.getLogger("d2norm")


def parse_args(argv=None):
    return default_argument_parser().parse_args(argv)


def _check_config_file(path):
    if not path:
        raise SystemExit(
            "--config-file is required, e.g. configs/synthetic/mask_rcnn_R_18_FPN_GN.yaml or the "
            "LazyConfig configs/lazy/synthetic/mask_rcnn_R_18_FPN_GN.py"
        )
    if not os.path.isfile(path):
        raise SystemExit(
            f"Config file not found: {path!r}. Fix: pass an existing YAML or LazyConfig (.py), e.g. "
            "configs/synthetic/mask_rcnn_R_18_FPN_GN.yaml or configs/lazy/synthetic/mask_rcnn_R_18_FPN_GN.py"
        )


def setup(args):
    """Build the yacs config from ``--config-file`` and ``opts`` (with the D2NORM node)."""
    cfg = get_cfg()
    add_d2norm_config(cfg)
    _check_config_file(args.config_file)
    try:
        cfg.merge_from_file(args.config_file)
        cfg.merge_from_list(args.opts)
    except (KeyError, ValueError, AssertionError) as e:
        raise SystemExit(
            f"Invalid configuration ({args.config_file} + {args.opts}): {e}. Fix: correct the key or "
            "value; d2norm's own options live under D2NORM.* (their keys and defaults: "
            "CONFIG_SECTIONS in d2norm/norms.py)."
        ) from None
    cfg.freeze()
    default_setup(cfg, args)
    setup_d2norm_logger(cfg.OUTPUT_DIR)
    return cfg


def setup_lazy(args):
    """Load the LazyConfig ``--config-file`` with the ``key=value`` overrides in ``opts``, check
    that it can train (or evaluate), and set up logging as :func:`setup` does."""
    _check_config_file(args.config_file)
    try:
        conf = load_lazy_config(args.config_file, args.opts)
        check_trainable(conf, args.config_file, eval_only=args.eval_only)
    except (KeyError, ValueError, AssertionError) as e:
        raise SystemExit(f"Invalid LazyConfig ({args.config_file} + {args.opts}): {e}") from None
    default_setup(conf, args)
    setup_d2norm_logger(conf.train.output_dir)
    return conf


def setup_d2norm_logger(output_dir):
    """Send d2norm's messages (every logger under ``"d2norm"``: the CBN regime warning, skipped
    non-finite steps, weight loading, the model printout) where detectron2's ``default_setup``
    sends its own: the console and ``<output_dir>/log.txt`` (``log.txt.rank<N>`` on other ranks),
    with detectron2's ``setup_logger``."""
    from detectron2.utils.logger import setup_logger

    return setup_logger(output_dir, distributed_rank=comm.get_rank(), name="d2norm", abbrev_name="d2norm")


def main(args):
    if is_lazy_config(args.config_file):
        return lazy_main(args)
    cfg = setup(args)
    register_datasets(cfg)
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


def lazy_main(args):
    """:func:`main` for a LazyConfig (:mod:`d2norm.engine.lazy_trainer`)."""
    conf = setup_lazy(args)
    register_datasets(trainer_config(conf))
    if args.eval_only:
        model = build_lazy_model(conf)
        D2NormCheckpointer(model, save_dir=conf.train.output_dir).resume_or_load(
            conf.train.init_checkpoint, resume=args.resume
        )
        return lazy_test(conf, model)
    trainer = LazyTrainer(conf)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def cli(argv=None):
    """``train_net.py`` (and the ``d2norm-train`` command of an installed package): parse the
    command line and launch :func:`main` in ``--num-gpus`` processes."""
    args = parse_args(argv)
    return launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
        device=config_device(args),  # "cpu": gloo processes; CUDA: detectron2's launch (NCCL)
        stop_signals=config_stop_signals(args),  # D2NORM.PREEMPT.SIGNALS, passed on to the workers
    )


# ---------------------------------------------------------------------------------- launching
DEFAULT_TIMEOUT = timedelta(minutes=30)


def _read_config(args):
    """The config ``args`` describe, or None if it cannot be read (``main`` then reports it)."""
    try:
        if is_lazy_config(args.config_file):
            return trainer_config(load_lazy_config(args.config_file, args.opts))
        cfg = get_cfg()
        add_d2norm_config(cfg)
        cfg.merge_from_file(args.config_file)
        cfg.merge_from_list(args.opts)
        return cfg
    except Exception:
        return None


def config_device(args):
    """``MODEL.DEVICE`` of the config that ``args`` describe; the default device if the config
    cannot be read."""
    cfg = _read_config(args)
    if cfg is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.MODEL.DEVICE


def config_stop_signals(args):
    """``D2NORM.PREEMPT.SIGNALS`` of the config that ``args`` describe (the default if the config
    cannot be read; an invalid name is reported by the workers)."""
    cfg = _read_config(args)
    try:
        return parse_signals(cfg.D2NORM.PREEMPT.SIGNALS)
    except (AttributeError, ValueError):
        return parse_signals(add_d2norm_config(get_cfg()).D2NORM.PREEMPT.SIGNALS)


def launch(
    main_func,
    num_processes_per_machine,
    num_machines=1,
    machine_rank=0,
    dist_url=None,
    args=(),
    timeout=DEFAULT_TIMEOUT,
    device=None,
    stop_signals=(),
):
    """Run ``main_func(*args)`` in ``num_machines × num_processes_per_machine`` processes.

    ``device`` (``MODEL.DEVICE``; default: "cuda" if available) picks the backend: a CUDA device
    goes to detectron2's ``launch`` (one process per GPU, NCCL); "cpu" to :func:`launch_cpu`
    (gloo). ``--num-gpus N`` is the number of processes per machine either way.

    With several processes, this process waits for them: the first of ``stop_signals`` it
    receives is passed on to the workers (they stop after the iteration in progress, with a
    checkpoint), a second one kills them at once. When the workers stopped on a signal, this
    process exits with their status (``D2NORM.PREEMPT.EXIT_CODE``).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if num_machines * num_processes_per_machine == 1:
        return main_func(*args)
    ctx = multiprocessing.get_context("spawn")
    stop, status = ctx.Value("i", 0), ctx.Value("i", 0)
    worker_args = (stop, status, main_func, *args)
    with _forward_stop_signals(stop, stop_signals):
        if str(device).startswith("cpu"):
            launch_cpu(
                _run_stoppable,
                num_processes_per_machine,
                num_machines,
                machine_rank,
                dist_url,
                worker_args,
                timeout,
            )
        else:
            from detectron2.engine import launch as d2_launch

            d2_launch(
                _run_stoppable,
                num_processes_per_machine,
                num_machines=num_machines,
                machine_rank=machine_rank,
                dist_url=dist_url,
                args=worker_args,
                timeout=timeout,
            )
    if status.value:
        logger.warning("The workers stopped on a signal; exiting with status %d.", status.value)
        raise SystemExit(status.value)


def _run_stoppable(stop, status, main_func, *args):
    """A worker: ``main_func(*args)``, stopping also when the launcher sets ``stop``; a stop on
    a signal is reported in ``status`` and the worker exits normally (so that the launcher does
    not terminate the other workers while they finish)."""
    set_launcher_stop(stop)
    try:
        return main_func(*args)
    except TrainingPreempted as e:
        with status.get_lock():
            status.value = int(e.code)
    finally:
        set_launcher_stop(None)


@contextlib.contextmanager
def _forward_stop_signals(stop, signals):
    """In the launching process: the first of ``signals`` sets ``stop`` (read by the workers),
    a second kills the workers and this process."""
    if not signals:
        yield
        return

    def handle(signum, frame):
        name = signal.Signals(signum).name
        if stop.value:
            os.write(2, f"\n{name} received again: killing the workers, no checkpoint.\n".encode())
            for p in multiprocessing.active_children():
                p.kill()
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        stop.value = int(signum)
        logger.warning(
            "%s received by the launcher: the workers stop after the iteration in progress and "
            "write a checkpoint (send it again to kill them at once, without one).",
            name,
        )

    previous = {sig: signal.signal(sig, handle) for sig in parse_signals(signals)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def launch_cpu(
    main_func,
    num_processes_per_machine,
    num_machines=1,
    machine_rank=0,
    dist_url=None,
    args=(),
    timeout=DEFAULT_TIMEOUT,
):
    """detectron2's ``launch`` for CPU processes: spawn, init a gloo process group, run.

    detectron2 v0.6's worker requires CUDA and NCCL. Here each process joins a gloo group
    (``dist_url``: "auto"/None = a free localhost port, single machine only), sets detectron2's
    local process group, and uses ``cpu_count / processes`` torch threads. ``timeout`` bounds
    every collective, so a process that stops participating makes the others fail instead of
    hanging.
    """
    world_size = num_machines * num_processes_per_machine
    if world_size == 1:
        return main_func(*args)
    if dist_url in (None, "auto"):
        if num_machines != 1:
            raise ValueError(
                "--dist-url auto only works on one machine. Fix: pass --dist-url "
                "tcp://<address of machine 0>:<port> on every machine."
            )
        dist_url = f"tcp://127.0.0.1:{_free_port()}"
    mp.spawn(
        _cpu_worker,
        nprocs=num_processes_per_machine,
        args=(main_func, world_size, num_processes_per_machine, machine_rank, dist_url, args, timeout),
        daemon=False,
    )


def _free_port():
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cpu_worker(local_rank, main_func, world_size, num_per_machine, machine_rank, dist_url, args, timeout):
    import d2norm  # noqa: F401  (a spawned process starts fresh: the _C stand-in, norm names)

    rank = machine_rank * num_per_machine + local_rank
    dist.init_process_group("gloo", init_method=dist_url, world_size=world_size, rank=rank, timeout=timeout)
    try:
        with local_process_group(num_per_machine, machine_rank):  # d2norm.patches
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // num_per_machine))
            comm.synchronize()
            main_func(*args)
    finally:
        dist.destroy_process_group()
