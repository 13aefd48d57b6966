"""A process SIGKILLed in the middle of writing a checkpoint leaves the previous checkpoint and
``last_checkpoint`` loadable (D2NormCheckpointer writes a temp file, fsyncs, renames); the files
get the permissions a plain ``torch.save`` gives; ``--resume`` over an unreadable newest
checkpoint falls back to the newest readable one, with a warning naming both."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from helpers import REPO
from torch import nn

import d2norm  # noqa: F401

pytestmark = pytest.mark.slow  # child processes killed mid-write

# The child saves checkpoint 1 (weights = 1), then saves weights = 2 through a writer that
# stalls after 1 MiB; it prints MIDWRITE there and the parent SIGKILLs it.
_CHILD = textwrap.dedent("""
    import sys, time
    import torch
    from torch import nn
    mode, out = sys.argv[1], sys.argv[2]
    model = nn.Linear(1024, 1024)  # 4 MiB of weights
    with torch.no_grad():
        model.weight.fill_(1.0)
    if mode == "plain":  # control: an in-place, non-atomic torch.save
        save = lambda name: torch.save({"model": model.state_dict()}, f"{out}/{name}.pth")
        save("model_0000001")
        open(f"{out}/last_checkpoint", "w").write("model_0000001.pth")
    else:
        import d2norm
        from d2norm.checkpoint import D2NormCheckpointer
        save = D2NormCheckpointer(model, save_dir=out).save
        save("model_0000001")
    real_save = torch.save

    class StallingFile:
        def __init__(self, f):
            self.f, self.n = f, 0
        def write(self, b):
            r = self.f.write(b)
            self.n += len(b)
            if self.n > (1 << 20):
                self.f.flush()
                print("MIDWRITE", flush=True)
                time.sleep(120)
            return r
        def __getattr__(self, k):
            return getattr(self.f, k)

    def stalling_save(obj, f, *a, **k):
        if isinstance(f, str):
            f = open(f, "wb")
        return real_save(obj, StallingFile(f), *a, **k)

    torch.save = stalling_save
    with torch.no_grad():
        model.weight.fill_(2.0)
    print("SAVING", flush=True)
    save("model_0000001" if mode in ("overwrite", "plain") else "model_0000002")
    print("NOT KILLED", flush=True)
""")


def _run_and_kill(mode, out):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, mode, str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        text=True,
    )
    lines = []
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.strip())
            if line.strip() == "MIDWRITE":
                os.kill(proc.pid, signal.SIGKILL)
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    assert lines[-2:] == ["SAVING", "MIDWRITE"], lines
    assert proc.returncode == -signal.SIGKILL


def _load(out):
    from d2norm.checkpoint import D2NormCheckpointer

    model = nn.Linear(1024, 1024)
    D2NormCheckpointer(model, save_dir=str(out)).resume_or_load("", resume=True)
    return model


@pytest.mark.parametrize("mode", ["overwrite", "new"])
def test_kill_during_save_keeps_previous_checkpoint(tmp_path, mode):
    _run_and_kill(mode, tmp_path)
    # the kill really happened mid-write: a partial temporary file is left behind
    partial = [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    assert len(partial) == 1 and (tmp_path / partial[0]).stat().st_size > (1 << 20)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert not (tmp_path / "model_0000002.pth").exists()
    model = _load(tmp_path)
    assert torch.equal(model.weight, torch.ones(1024, 1024))  # the previous weights, intact


def test_control_a_plain_save_killed_midway_is_corrupt(tmp_path):
    """The same kill during a non-atomic in-place save destroys the previous checkpoint: the
    test above would catch a checkpointer that wrote in place."""
    from d2norm.checkpoint import CheckpointError

    _run_and_kill("plain", tmp_path)
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        _load(tmp_path)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_checkpoint_files_get_the_mode_of_a_plain_torch_save(tmp_path, umask):
    from d2norm.checkpoint import D2NormCheckpointer

    previous = os.umask(umask)
    try:
        torch.save({"w": torch.ones(1)}, str(tmp_path / "plain.pth"))  # the reference
        D2NormCheckpointer(nn.Linear(2, 1), save_dir=str(tmp_path)).save("model_0000001")
    finally:
        os.umask(previous)
    expected = (tmp_path / "plain.pth").stat().st_mode
    assert expected & 0o777 == 0o666 & ~umask
    assert (tmp_path / "model_0000001.pth").stat().st_mode == expected
    assert (tmp_path / "last_checkpoint").stat().st_mode == expected


def test_resume_falls_back_over_a_truncated_newest_checkpoint(tmp_path, caplog):
    import logging

    from d2norm.checkpoint import D2NormCheckpointer

    def save(value, name):
        model = nn.Linear(4, 4)
        with torch.no_grad():
            model.weight.fill_(value)
        D2NormCheckpointer(model, save_dir=str(tmp_path)).save(name, iteration=value)

    save(1, "model_0000001")
    save(2, "model_0000002")
    save(3, "model_0000003")
    newest = tmp_path / "model_0000003.pth"
    newest.write_bytes(newest.read_bytes()[:300])  # truncated, and still the newest file
    os.utime(tmp_path / "model_0000001.pth", (time.time() - 100,) * 2)
    os.utime(tmp_path / "model_0000002.pth", (time.time() - 50,) * 2)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000003.pth"
    model = nn.Linear(4, 4)
    with caplog.at_level(logging.WARNING):
        loaded = D2NormCheckpointer(model, save_dir=str(tmp_path)).resume_or_load("", resume=True)
    assert loaded["iteration"] == 2 and torch.equal(model.weight, torch.full((4, 4), 2.0))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(newest) in w and str(tmp_path / "model_0000002.pth") in w for w in warnings), warnings
