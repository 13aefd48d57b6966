"""Checkpointing: atomic writes, loading through detectron2's checkpointer with d2norm's rules.

- ``save`` writes ``<name>.pth`` to a temporary file in the same folder, flushes and fsyncs it,
  and renames it into place; ``last_checkpoint`` is replaced the same way. A crash during a save
  leaves the previous checkpoint and tag intact (:func:`atomic_write_bytes`,
  :func:`atomic_torch_save`: the project's one implementation of an atomic write).
- Loading accepts weights saved from plain convs (``X.weight``) into weight-standardized /
  centralized convs (``X.parametrizations.weight.original``) and the reverse, including
  Detectron/detectron2 ``.pkl`` files matched by detectron2's name heuristics.
- Norm method state (MABN's official layout, CBN / MABN history of another buffer size) is
  converted before fvcore compares shapes (:func:`d2norm.weights.adapt_method_state`), in files
  read by detectron2's name matching too (:func:`d2norm.weights.split_method_history`).
- A missing or unreadable file raises an error that names the file and the fix; the
  checkpointer stays usable after a failed load. A ``?matching_heuristics=True`` suffix on the
  path (detectron2's syntax after v0.6) matches names heuristically on every detectron2 version.
- Pretrained files: torchvision-style ResNet state dicts are renamed to detectron2 names, and a
  file that matches nothing, or whose backbone tensors have wrong shapes or are missing, raises
  an error naming the file and the keys (:mod:`d2norm.weights`; ``strict_backbone``).

File formats, key matching and the errors live in :mod:`d2norm.weights`; this module loads.
"""

import logging
import os
import re
import tempfile
from urllib.parse import parse_qs, urlparse

import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.checkpoint.c2_model_loading import align_and_update_state_dicts

from .layers.weight_transforms import plain_weight_key, remap_parametrized_keys
from .safe_pickle import UnsafePickleError, load_weights_pickle
from .weights import (
    CheckpointError,
    adapt_method_state,
    check_loaded_weights,
    normalize_loaded_checkpoint,
    split_method_history,
)

logger = logging.getLogger(__name__)

__all__ = [
    "D2NormCheckpointer",
    "CheckpointError",
    "UnreadableCheckpointError",
    "read_weights_file",
    "load_pretrained_backbone",
    "atomic_write_bytes",
    "atomic_torch_save",
]


def atomic_write_bytes(path, writer):
    """Call ``writer(file)`` on a temp file next to ``path``, fsync, then rename onto ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    mode = _new_file_mode(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, mode)  # mkstemp creates 0600; an open(path, "wb") would not
        with os.fdopen(fd, "wb") as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _new_file_mode(path):
    """The permissions ``open(path, "wb")`` gives: the existing file's, else 0666 less the umask."""
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_torch_save(obj, path):
    atomic_write_bytes(path, lambda f: torch.save(obj, f))


class UnreadableCheckpointError(CheckpointError):
    """A checkpoint file that cannot be read at all (corrupt, truncated, not a checkpoint);
    ``reason``: the underlying error in one line."""

    def __init__(self, message, reason=""):
        super().__init__(message)
        self.reason = reason


def read_weights_file(f):
    """The checkpoint dict in file ``f``, by detectron2's format rules, without running code from
    the file: ``.pkl`` through :func:`d2norm.safe_pickle.load_weights_pickle`, anything else
    through ``torch.load(weights_only=True)``. Detectron2 model-zoo ``.pkl`` files
    (``{"model": ..., "__author__": ...}``) are returned as they are; other ``.pkl`` files are
    Caffe2 / Detectron blobs (``{"blobs": ...}`` or the blobs themselves, ``*_momentum`` dropped)
    and matched by name heuristics, as are pycls ``.pyth`` files (``model_state``)."""
    if f.endswith(".pkl"):
        data = load_weights_pickle(f)
        if not isinstance(data, dict):
            raise ValueError(f"a .pkl weights file holds a dict, this one a {type(data).__name__}")
        if "model" in data and "__author__" in data:
            logger.info("Reading a file from '%s'", data["__author__"])
            return data
        blobs = data.get("blobs", data)
        blobs = {k: v for k, v in blobs.items() if not k.endswith("_momentum")}
        return {"model": blobs, "__author__": "Caffe2", "matching_heuristics": True}
    loaded = torch.load(f, map_location=torch.device("cpu"), weights_only=True)
    if f.endswith(".pyth"):
        if "model_state" not in loaded:
            raise ValueError(f"pycls .pyth files hold 'model_state'; this one has {sorted(loaded)}")
        state = {k: v for k, v in loaded["model_state"].items() if not k.endswith("num_batches_tracked")}
        return {"model": state, "__author__": "pycls", "matching_heuristics": True}
    return loaded if "model" in loaded else {"model": loaded}


def _first_line(e, limit=200):
    """``Type: first line of the message`` (torch's unpickling errors run to many lines; for
    them, the unpickler's own reason, not the advice about ``weights_only``)."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    text = lines[0] if lines else ""
    for i, line in enumerate(lines[:-1]):
        if line.endswith("WeightsUnpickler error:"):
            text = f"unpickling failed: {lines[i + 1]}"
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def split_query(path):
    """``(file, {"matching_heuristics": bool})`` of a weights path with an optional
    ``?matching_heuristics=True`` suffix (detectron2's syntax, read here on every version)."""
    parsed = urlparse(path)
    if not parsed.query or parsed.scheme not in ("", "file"):
        return path, {}
    queries = parse_qs(parsed.query)
    value = queries.pop("matching_heuristics", ["False"])
    if queries or value not in (["True"], ["False"]):
        raise CheckpointError(
            f"Unsupported query in weights path {path!r}: only '?matching_heuristics=True' (match "
            "the file's names to the model's by detectron2's heuristics) is understood. Fix: "
            "remove the query, or use exactly that suffix."
        )
    return parsed._replace(query="").geturl(), {"matching_heuristics": value == ["True"]}


class D2NormCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` with atomic saves and d2norm-aware loading (module docstring)."""

    #: Refuse files whose backbone tensors have wrong shapes or are missing (d2norm.weights).
    strict_backbone = True
    #: :class:`d2norm.weights.LoadReport` of the last model load (None before any).
    last_load_report = None

    def save(self, name, **kwargs):
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", save_file)
        atomic_torch_save(data, save_file)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename):
        if not self.save_to_disk:
            return
        path = os.path.join(self.save_dir, "last_checkpoint")
        atomic_write_bytes(path, lambda f: f.write(last_filename_basename.encode()))

    def resume_or_load(self, path, *, resume=True):
        """detectron2's ``resume_or_load``; on resume, a ``last_checkpoint`` file that cannot be
        read (corrupt, truncated) is skipped with a warning naming it and the file used instead,
        the newest readable ``.pth`` in the output directory (by modification time)."""
        if not (resume and self.has_checkpoint()):
            return self.load(path, checkpointables=[])
        newest = self.get_checkpoint_file()
        candidates = [newest] + [c for c in self._checkpoints_newest_first() if c != newest]
        failures = []
        for candidate in candidates:
            try:
                result = self.load(candidate)
            except UnreadableCheckpointError as e:
                failures.append((candidate, e))
                continue
            if failures:
                skipped = "; ".join(f"{c} ({e.reason})" for c, e in failures)
                logger.warning(
                    "--resume: could not read checkpoint %s; resuming from %s instead, the newest "
                    "readable checkpoint in %s. Unreadable: %s.",
                    newest,
                    candidate,
                    self.save_dir,
                    skipped,
                )
            return result
        tried = ", ".join(c for c, _ in failures)
        raise UnreadableCheckpointError(
            f"--resume found no readable checkpoint in {self.save_dir!r}: tried {tried}; each is "
            f"corrupt or truncated ({failures[0][1].reason}). Fix: remove the unreadable files and "
            "'last_checkpoint' to start over, or resume from a copy of the run's checkpoints.",
            reason=failures[0][1].reason,
        )

    def _checkpoints_newest_first(self):
        files = [f for f in self.get_all_checkpoint_files() if os.path.isfile(f)]
        return sorted(files, key=lambda f: (os.path.getmtime(f), f), reverse=True)

    def load(self, path, checkpointables=None):
        options = {}
        if path and "://" not in path:
            path, options = split_query(path)
            if not os.path.isfile(path):
                raise CheckpointError(
                    f"Weights file not found: {path!r} (MODEL.WEIGHTS or --resume's "
                    "last_checkpoint). Fix: point MODEL.WEIGHTS at an existing .pth/.pkl file, or "
                    'set MODEL.WEIGHTS "" to train from scratch.'
                )
        self._load_options = options
        try:
            return super().load(path, checkpointables=checkpointables)
        finally:
            self._load_options = {}
            # detectron2 after v0.6 keeps the parsed path of the load in progress and asserts
            # it is unset at the next load; a failed load must not leave it set.
            if hasattr(self, "_parsed_url_during_load"):
                self._parsed_url_during_load = None

    def _load_file(self, f):
        self._loading_path = f
        try:
            loaded = read_weights_file(f)
        except UnsafePickleError as e:
            raise CheckpointError(str(e)) from None
        except Exception as e:  # corrupt/truncated file, wrong format
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
            if found:  # torch's weights_only refusal
                raise CheckpointError(
                    f"Refusing to read {f!r}: it refers to the Python global '{found.group(1)}', "
                    "which a checkpoint (tensors "
                    "and plain values) never needs; reading it on would run code from the file, "
                    "so nothing from it was run. Fix: use a checkpoint written by detectron2 / "
                    "d2norm, or re-save the state dict of a file you trust as plain tensors."
                ) from None
            raise UnreadableCheckpointError(
                f"Could not read checkpoint {f!r} ({_first_line(e)}). The file is corrupt, "
                "truncated or not a detectron2/torch checkpoint. Fix: point MODEL.WEIGHTS at a "
                "valid file (--resume falls back to the newest readable checkpoint by itself).",
                reason=_first_line(e),
            ) from None
        if getattr(self, "_load_options", {}).get("matching_heuristics"):
            loaded["matching_heuristics"] = True
        return normalize_loaded_checkpoint(loaded, f)

    def _load_model(self, checkpoint):
        model_sd = self.model.state_dict()
        if checkpoint.get("matching_heuristics", False):
            # Match names against the model's plain names (X.weight for parametrized convs).
            self._convert_ndarray_to_tensor(checkpoint["model"])
            plain_model_sd = {plain_weight_key(k): v for k, v in model_sd.items()}
            # method history keeps its shape for adapt_method_state (detectron2's matching drops it)
            rest, history = split_method_history(checkpoint["model"], plain_model_sd.keys())
            checkpoint["model"] = align_and_update_state_dicts(
                plain_model_sd,
                rest,
                c2_conversion=checkpoint.get("__author__", None) == "Caffe2",
            )
            checkpoint["model"].update(history)
            checkpoint["matching_heuristics"] = False
        checkpoint["model"] = remap_parametrized_keys(checkpoint["model"], model_sd.keys())
        self._convert_ndarray_to_tensor(checkpoint["model"])
        # before fvcore drops every key whose shape differs from the model's
        adapted = adapt_method_state(self.model, checkpoint["model"])
        file_shapes = {k: tuple(getattr(v, "shape", ())) for k, v in checkpoint["model"].items()}
        incompatible = super()._load_model(checkpoint)
        if incompatible is not None:
            self.last_load_report = check_loaded_weights(
                self.model,
                getattr(self, "_loading_path", "<checkpoint>"),
                file_shapes,
                incompatible,
                strict_backbone=self.strict_backbone,
                adapted=adapted,
            )
        return incompatible


def load_pretrained_backbone(model, path, strict_backbone=True):
    """Load a pretrained file (any format of :mod:`d2norm.weights`) into ``model`` by name,
    applying the checks; returns the :class:`~d2norm.weights.LoadReport`. Same as what
    ``MODEL.WEIGHTS`` does through :class:`D2NormCheckpointer`, without a trainer."""
    checkpointer = D2NormCheckpointer(model, save_to_disk=False)
    checkpointer.strict_backbone = strict_backbone
    checkpointer.load(path, checkpointables=[])
    return checkpointer.last_load_report
