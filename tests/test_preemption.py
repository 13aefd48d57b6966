"""A signal during training (D2NORM.PREEMPT): the iteration in progress finishes, every rank stops
after the same iteration, rank 0 writes the checkpoint, the metrics are flushed, the exit status
is D2NORM.PREEMPT.EXIT_CODE, and ``--resume`` continues exactly as the uninterrupted run (same
losses, same final weights and norm state); a second signal ends the process at once.

Signals arrive in the middle of an iteration (from a forward pre-hook) at iterations drawn at
random, in one process, in 2 gloo processes (on one rank only), and across two "machines"
(``--num-machines 2``, two processes each, on 127.0.0.1), where the launcher of machine 1 gets
SIGTERM and SyncBN is checked against float64 BN on the batch of all 4 processes.
"""

import json
import multiprocessing
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from datetime import timedelta

import pytest
import torch

from detectron2.engine import HookBase

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
pytestmark = pytest.mark.slow  # training runs, child processes
MAX_ITER = 6
EXIT_CODE = 75  # D2NORM.PREEMPT.EXIT_CODE's default
_DRAW = random.Random(27)
# (norm, iteration during which the signal arrives, signal): iterations drawn at random
CASES = [
    ("CBN", _DRAW.randrange(MAX_ITER - 1), signal.SIGTERM),
    ("MABN", _DRAW.randrange(MAX_ITER - 1), signal.SIGUSR1),
    ("CBN", _DRAW.randrange(MAX_ITER - 1), signal.SIGINT),
]


class SignalDuringStep(HookBase):
    """Sends ``sig`` to this process from inside the model's forward of iteration ``at``
    (on ``rank`` only, if given) — ``times`` times."""

    def __init__(self, at, sig=signal.SIGTERM, rank=None, times=1):
        self.at, self.sig, self.rank, self.times = at, sig, rank, times
        self._fired = False

    def before_train(self):
        self._handle = self.trainer.model.register_forward_pre_hook(self._fire)

    def after_train(self):
        self._handle.remove()

    def _fire(self, module, inputs):
        from detectron2.utils import comm

        if self._fired or self.trainer.iter != self.at:
            return
        if self.rank is not None and comm.get_rank() != self.rank:
            return
        self._fired = True
        for _ in range(self.times):
            os.kill(os.getpid(), self.sig)


class TouchAfterStep(HookBase):
    """Creates ``path`` after iteration ``at`` on ``rank``: the run is under way."""

    def __init__(self, path, at, rank):
        self.path, self.at, self.rank = path, at, rank

    def after_step(self):
        from detectron2.utils import comm

        if self.trainer.iter == self.at and comm.get_rank() == self.rank:
            open(self.path, "w").close()


def train(norm, data_root, out_dir, max_iter=MAX_ITER, hooks=(), resume=False, **overrides):
    """Train the tiny synthetic Mask R-CNN; ``({iteration: total_loss}, trainer)``."""
    from helpers import synthetic_cfg

    from d2norm.data import register_synthetic_datasets
    from d2norm.engine import Trainer

    from detectron2.utils.env import seed_all_rng

    register_synthetic_datasets(data_root, ["d2norm_shapes_tiny_train"])
    cfg = synthetic_cfg(
        norm,
        **{
            "D2NORM.DATA.ROOT": data_root,
            "DATASETS.TEST": (),
            "SOLVER.MAX_ITER": max_iter,
            "SOLVER.CHECKPOINT_PERIOD": 1000,
            "OUTPUT_DIR": str(out_dir),
            "D2NORM.CBN.BURNIN_ITERS": 1,
            "D2NORM.MABN.WARMUP_ITERS": 2,
            "D2NORM.MABN.BUFFER_SIZE": 2,
            **overrides,
        },
    )
    seed_all_rng(cfg.SEED)
    trainer = Trainer(cfg)
    trainer.register_hooks(list(hooks))
    trainer.resume_or_load(resume=resume)
    try:
        trainer.train()
    finally:
        history = trainer.storage.histories().get("total_loss")  # rank 0 only records losses
        trainer.losses = {it: v for v, it in history.values()} if history else {}
    return trainer.losses, trainer


def _state_differences(a, b):
    """Names of the entries where the state dicts of models ``a`` and ``b`` differ."""
    a, b = a.state_dict(), b.state_dict()
    return sorted(a.keys() ^ b.keys()) + [k for k in a.keys() & b.keys() if not torch.equal(a[k], b[k])]


_FULL = {}


def _full_run(norm, data_root, tmp_path_factory):
    if norm not in _FULL:
        _FULL[norm] = train(norm, data_root, tmp_path_factory.mktemp(f"full_{norm}"))
    return _FULL[norm]


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{n}-it{a}-{s.name}" for n, a, s in CASES])
def test_signal_stops_with_a_checkpoint_and_resume_is_exact(tmp_path, tmp_path_factory, data_root, case):
    from d2norm.engine.preemption import TrainingPreempted

    norm, at, sig = CASES[case]
    full, full_trainer = _full_run(norm, data_root, tmp_path_factory)
    assert sorted(full) == list(range(MAX_ITER))

    previous_handler = signal.getsignal(sig)
    with pytest.raises(TrainingPreempted) as info:
        train(norm, data_root, tmp_path, hooks=[SignalDuringStep(at, sig)])
    stop = info.value
    assert signal.getsignal(sig) == previous_handler  # the handlers are restored
    assert (stop.code, stop.iteration, stop.signal_name) == (EXIT_CODE, at, sig.name)
    # the iteration in progress finished, its checkpoint is the newest, the metrics are flushed
    assert stop.checkpoint == str(tmp_path / f"model_{at:07d}.pth")
    assert (tmp_path / "last_checkpoint").read_text() == f"model_{at:07d}.pth"
    assert sorted(p for p in os.listdir(tmp_path) if p.endswith(".pth")) == [f"model_{at:07d}.pth"]
    metrics = [json.loads(line) for line in open(tmp_path / "metrics.json")]
    assert max(m["iteration"] for m in metrics) == at
    assert any(m["iteration"] == at and "total_loss" in m for m in metrics), metrics

    torch.manual_seed(12345)  # any RNG state: the checkpoint restores it
    resumed, trainer = train(norm, data_root, tmp_path, resume=True)
    assert trainer.start_iter == at + 1 and sorted(resumed) == list(range(at + 1, MAX_ITER))
    for it in resumed:
        assert resumed[it] == full[it], f"iteration {it}: {resumed[it]} != {full[it]}"
    assert not _state_differences(trainer.model, full_trainer.model)  # weights, CBN/MABN history

    if case == 0:  # control: the same resume without the RNG state in the checkpoint differs
        ckpt = tmp_path / f"model_{at:07d}.pth"
        state = torch.load(str(ckpt), weights_only=True)
        del state["rng"]
        torch.save(state, str(ckpt))
        (tmp_path / "last_checkpoint").write_text(ckpt.name)
        torch.manual_seed(12345)
        broken, trainer = train(norm, data_root, tmp_path, resume=True)
        assert any(broken[it] != full[it] for it in broken)


def test_signals_config_is_checked(data_root, tmp_path):
    from d2norm.engine.preemption import parse_signals

    assert parse_signals(["TERM", "SIGUSR2"]) == [signal.SIGTERM, signal.SIGUSR2]
    for bad in ("SIGKILL", "SIGNOPE"):
        with pytest.raises(ValueError, match="D2NORM.PREEMPT.SIGNALS"):
            parse_signals([bad])


# --------------------------------------------------------------------- 2 gloo processes
def _two_process_worker(out, data_root, at):
    import torch.distributed as dist

    from d2norm.engine.preemption import TrainingPreempted

    torch.set_num_threads(1)
    rank = dist.get_rank()
    full, full_trainer = train("CBN", data_root, os.path.join(out, "full"))
    result = {"full": full}
    try:  # the signal reaches rank 1 only
        train("CBN", data_root, os.path.join(out, "stop"), hooks=[SignalDuringStep(at, rank=1)])
    except TrainingPreempted as e:
        result["stop"] = (e.code, e.iteration, e.signal_name)
    torch.manual_seed(100 + rank)
    resumed, trainer = train("CBN", data_root, os.path.join(out, "stop"), resume=True)
    result["resumed"] = resumed
    result["start_iter"] = trainer.start_iter
    result["state_differences"] = _state_differences(trainer.model, full_trainer.model)
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))


def test_two_processes_stop_after_the_same_iteration_and_resume_exactly(tmp_path, data_root):
    from d2norm.engine.launch import launch

    at = random.Random(2027).randrange(1, MAX_ITER - 1)
    watchdog = threading.Timer(600, lambda: [p.kill() for p in multiprocessing.active_children()])
    watchdog.daemon = True
    watchdog.start()
    try:
        launch(
            _two_process_worker,
            2,
            dist_url="auto",
            args=(str(tmp_path), data_root, at),
            device="cpu",
            timeout=timedelta(seconds=120),
        )
    finally:
        watchdog.cancel()
    ranks = [torch.load(str(tmp_path / f"rank{r}.pt"), weights_only=True) for r in (0, 1)]
    for r in ranks:
        assert r["stop"] == (EXIT_CODE, at, "SIGTERM")  # rank 0 stops too, after the same iteration
        assert r["start_iter"] == at + 1 and not r["state_differences"], r["state_differences"][:5]
    assert sorted(ranks[0]["resumed"]) == list(range(at + 1, MAX_ITER))  # rank 0 records losses
    for it, loss in ranks[0]["resumed"].items():
        assert loss == ranks[0]["full"][it], (it, loss, ranks[0]["full"][it])
    assert sorted(p for p in os.listdir(tmp_path / "stop") if p.endswith(".pth")) == [
        f"model_{at:07d}.pth",
        "model_final.pth",
    ]


# ------------------------------------------------------ launchers: 2 "machines", second signal
_SCRIPT = textwrap.dedent("""
    import os, sys
    from datetime import timedelta
    sys.path.insert(0, {tests!r})
    import torch
    import d2norm
    from d2norm.engine.launch import launch
    from d2norm.engine.preemption import TrainingPreempted, parse_signals

    def machine_worker(out, data_root):
        import torch.distributed as dist
        from test_distributed import _syncbn_case
        from test_preemption import TouchAfterStep, train
        torch.set_num_threads(1)
        rank = dist.get_rank()
        result = {{"world": dist.get_world_size(), "syncbn": _syncbn_case((1, 2, 0, 1))}}
        ready = TouchAfterStep(os.path.join(out, "ready"), at=1, rank=3)
        try:
            train("SyncBN", data_root, os.path.join(out, "run"), max_iter=200, hooks=[ready],
                  **{{"SOLVER.IMS_PER_BATCH": 4}})
        except TrainingPreempted as e:
            result["stop"] = e.iteration
            raise
        finally:
            torch.save(result, os.path.join(out, f"rank{{rank}}.pt"))

    if __name__ == "__main__":
        mode, out, data_root = sys.argv[1:4]
        torch.set_num_threads(1)
        if mode == "machine":
            machine, port = int(sys.argv[4]), int(sys.argv[5])
            launch(machine_worker, 2, num_machines=2, machine_rank=machine,
                   dist_url=f"tcp://127.0.0.1:{{port}}", args=(out, data_root), device="cpu",
                   timeout=timedelta(seconds=120), stop_signals=parse_signals(["SIGTERM"]))
        else:  # "twice": two signals during iteration 1 of one process
            from test_preemption import SignalDuringStep, train
            train("GN", data_root, out, hooks=[SignalDuringStep(1, times=2)])
""")


def _script(tmp_path):
    path = tmp_path / "preempt_main.py"
    path.write_text(_SCRIPT.format(tests=HERE))
    return str(path)


def _env():
    return dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_machines_syncbn_and_a_stop_across_them(tmp_path, data_root):
    out = tmp_path / "out"
    out.mkdir()
    script, port = _script(tmp_path), _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, script, "machine", str(out), data_root, str(m), str(port)],
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / f"machine{m}.log", "w"),
        )
        for m in (0, 1)
    ]
    try:
        deadline = time.time() + 300
        while not (out / "ready").exists() and time.time() < deadline:
            assert all(p.poll() is None for p in procs), "a launcher exited before training"
            time.sleep(0.5)
        assert (out / "ready").exists(), "training did not start"
        procs[1].send_signal(signal.SIGTERM)  # machine 1's launcher only
        codes = [p.wait(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = [(tmp_path / f"machine{m}.log").read_text() for m in (0, 1)]
    assert codes == [EXIT_CODE, EXIT_CODE], (codes, [log[-3000:] for log in logs])
    assert "SIGTERM received by the launcher" in logs[1]
    ranks = [torch.load(str(out / f"rank{r}.pt"), weights_only=True) for r in range(4)]
    stops = {r["stop"] for r in ranks}
    assert len(stops) == 1, stops  # every rank on both machines stopped after the same iteration
    (stop,) = stops
    assert stop >= 1
    assert (out / "run" / "last_checkpoint").read_text() == f"model_{stop:07d}.pth"
    for rank, r in enumerate(ranks):
        assert r["world"] == 4
        for key, value in r["syncbn"].items():  # statistics over the 4 processes' joint batch
            if key != "shape_ok":
                assert value < 2e-5, (rank, key, value)


def test_a_second_signal_exits_at_once_without_a_checkpoint(tmp_path, data_root):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, _script(tmp_path), "twice", str(out), data_root],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGTERM, proc.stderr[-3000:]
    assert "SIGTERM received again: exiting now, without a checkpoint" in proc.stderr
    assert not [p for p in os.listdir(out) if p.endswith(".pth")]
