"""Checkpointing: atomic writes, loading through detectron2's checkpointer with d2norm's rules.

- ``save`` writes ``<name>.pth`` to a temporary file in the same folder, flushes and fsyncs it,
  and renames it into place; ``last_checkpoint`` is replaced the same way. A crash during a save
  leaves the previous checkpoint and tag intact (:func:`atomic_write_bytes`,
  :func:`atomic_torch_save`: the project's one implementation of an atomic write).
- Loading accepts weights saved from plain convs (``X.weight``) into weight-standardized /
  centralized convs (``X.parametrizations.weight.original``) and the reverse, including
  Detectron/detectron2 ``.pkl`` files matched by detectron2's name heuristics.
- Norm method state (MABN's official layout, CBN / MABN history of another buffer size) is
  converted before fvcore compares shapes (:func:`d2norm.weights.adapt_method_state`).
- A missing or unreadable file raises an error that names the file and the fix; the
  checkpointer stays usable after a failed load. A ``?matching_heuristics=True`` suffix on the
  path (detectron2's syntax after v0.6) matches names heuristically on every detectron2 version.
- Pretrained files: torchvision-style ResNet state dicts are renamed to detectron2 names, and a
  file that matches nothing, or whose backbone tensors have wrong shapes or are missing, raises
  an error naming the file and the keys (:mod:`d2norm.weights`; ``strict_backbone``).

File formats, key matching and the errors live in :mod:`d2norm.weights`; this module loads.
"""

import os
import tempfile
from urllib.parse import parse_qs, urlparse

import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.checkpoint.c2_model_loading import align_and_update_state_dicts

from .layers.weight_transforms import plain_weight_key, remap_parametrized_keys
from .weights import (
    CheckpointError,
    adapt_method_state,
    check_loaded_weights,
    normalize_loaded_checkpoint,
)

__all__ = [
    "D2NormCheckpointer",
    "CheckpointError",
    "load_pretrained_backbone",
    "atomic_write_bytes",
    "atomic_torch_save",
]


def atomic_write_bytes(path, writer):
    """Call ``writer(file)`` on a temp file next to ``path``, fsync, then rename onto ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj, path):
    atomic_write_bytes(path, lambda f: torch.save(obj, f))


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
            loaded = super()._load_file(f)
        except Exception as e:  # corrupt/truncated file, wrong format
            raise CheckpointError(
                f"Could not read checkpoint {f!r} ({_first_line(e)}). The file is corrupt, "
                "truncated or not a detectron2/torch checkpoint. Fix: point MODEL.WEIGHTS at a "
                "valid file; with --resume, delete it and set 'last_checkpoint' in the output "
                "directory to the previous checkpoint."
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
            checkpoint["model"] = align_and_update_state_dicts(
                plain_model_sd,
                checkpoint["model"],
                c2_conversion=checkpoint.get("__author__", None) == "Caffe2",
            )
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
