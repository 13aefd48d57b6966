"""Pretrained weights: reading the files users bring, and refusing ones that do not fit.

:class:`~d2norm.checkpoint.D2NormCheckpointer` (``MODEL.WEIGHTS``) reads:

* detectron2 / Detectron ``.pkl`` files: a pickled dict of arrays, ``{"blobs": ...}``, or
  ``{"model": ..., "__author__": ...}``. Caffe2 names (``res2_0_branch2a_w``,
  ``res2_0_branch2a_gn_s`` / ``_gn_b``, ``res_conv1_bn_s``, ``conv1_gn_s``, ...) are renamed by
  detectron2's rules (``detectron2.checkpoint.c2_model_loading``) and matched by name suffix.
  A ``{"model": ..., "__author__": "Caffe2"}`` file without ``"matching_heuristics"`` is treated
  as Caffe2-named too, and ``*_momentum`` blobs are dropped.
* torchvision-style ResNet / ResNeXt state dicts (``conv1.weight``, ``bn1.*``,
  ``layer1.0.conv1.weight``, ``layer1.0.downsample.0.weight``, ...), as saved by torchvision and
  by the WS / MABN authors' ImageNet code, also under a ``module.`` prefix or inside
  ``{"state_dict": ...}``: :func:`convert_torchvision_resnet` renames them to detectron2's
  ResNet names (``stem.conv1.weight``, ``stem.conv1.norm.*``, ``res2.0.conv1.weight``,
  ``res2.0.shortcut.norm.*``, ...; the ``fc`` classifier and ``num_batches_tracked`` are
  dropped) and they are matched by name suffix like a detectron2 ``.pkl``. The BCN authors'
  BCN+WS files also have their norms renamed to d2norm's BCN layout (``pbn`` -> ``bn``, the
  per-group affine ``(1, G, 1)`` -> ``(G,)``). Such files expect
  RGB input normalized with torchvision's mean/std and the stride in the 3x3 conv:
  ``INPUT.FORMAT "RGB"``, ``MODEL.PIXEL_MEAN [123.675, 116.280, 103.530]``,
  ``MODEL.PIXEL_STD [58.395, 57.120, 57.375]``, ``MODEL.RESNETS.STRIDE_IN_1X1 False``.
* anything else torch can load (detectron2 / d2norm ``.pth`` checkpoints), by exact names.

In all cases a weight-standardized / centralized conv receives the file's ``X.weight`` as its
raw weight ``X.parametrizations.weight.original``.

**Method state is converted before shapes are compared** (:func:`adapt_method_state`, run by the
checkpointer before fvcore drops shape-mismatched keys):

* norm tensors stored as ``(1, C, 1, 1)`` (the official MABN layout: ``running_var``, and
  ``iters`` as ``(1,)``) are reshaped to the model's ``(C,)`` / ``()``, for a MABN layer and for
  the ``FrozenBatchNorm2d`` that replaces it in frozen stages;
* history that does not fit the model restarts, with a warning that says so: MABN ring buffers
  (``buffer_x2``, ``buffer_gz``) of another ``BUFFER_SIZE`` (the layer counts from 0 again, so it
  uses batch statistics until its ring is full; ``running_var`` and γ, β are loaded), CBN
  history (``hist_*``) of another ``BUFFER_SIZE`` or conv shape (the window restarts; the
  iteration count, hence burn-in, is kept).

**What is refused** (:func:`check_loaded_weights`, raising :class:`CheckpointError` with the
file, the keys and the fix):

1. a non-empty file of which no tensor is loaded into the model (wrong format or model);
2. a tensor matched by name to a parameter/buffer of the backbone's bottom-up network
   (``backbone.bottom_up`` for FPN models, else ``backbone``) with a different shape (e.g. an
   R-18 file for an R-50 model, or grouped convs of another width);
3. when any bottom-up tensor is loaded, bottom-up *parameters* (conv weights, norm affine) that
   the file does not provide (e.g. an R-50 file for an R-101 model). Buffers such as
   FrozenBN's statistics (Caffe2 files store the folded affine only), CBN/MABN history and
   deformable-conv offsets are exempt.

Everything else keeps detectron2's behaviour: keys of the file the model does not use (an
ImageNet classifier, BN running statistics loaded into a GN model) and model keys the file
lacks (FPN and heads of an ImageNet file) are logged as warnings; shape mismatches outside the
bottom-up network (a box predictor for another number of classes) are skipped with a warning.
Set ``D2NormCheckpointer.strict_backbone = False`` (class or instance) to turn rules 2-3 off.
"""

import logging
import re
from collections import namedtuple

import torch

from .download import download  # fetching the recipes' pretrained files (d2norm.download)
from .layers.weight_transforms import plain_weight_key
from .norms import NORMS, norm_layer_types, spec_of

__all__ = [
    "CheckpointError",
    "adapt_method_state",
    "split_method_history",
    "convert_torchvision_resnet",
    "to_torchvision_resnet",
    "is_torchvision_resnet",
    "normalize_loaded_checkpoint",
    "check_loaded_weights",
    "LoadReport",
    "download",
]

logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A weights or checkpoint file that cannot be used; the message names the file and the fix."""


#: Result of a load: model keys filled from the file, bottom-up keys among them, the file's keys
#: the model did not use, and what :func:`adapt_method_state` converted or restarted.
LoadReport = namedtuple(
    "LoadReport", ["path", "loaded", "backbone_loaded", "unused", "adapted"], defaults=((),)
)

_TV_BLOCK = re.compile(r"^layer(\d+)\.(\d+)\.(.+)$")
_TV_BN = re.compile(r"^bn(\d+)\.(.+)$")
_TV_DOWNSAMPLE = re.compile(r"^downsample\.([01])\.(.+)$")
_EXEMPT_MISSING = ("conv2_offset.",)  # deformable-conv offsets: zero-initialized by design


def _strip_prefix(state_dict, prefix):
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix) :]: v for k, v in state_dict.items()}
    return state_dict


def is_torchvision_resnet(state_dict):
    """Whether ``state_dict`` uses torchvision's ResNet names (``conv1.weight`` and
    ``layer1.0.conv1.weight`` at the top level)."""
    keys = set(state_dict)
    return "conv1.weight" in keys and any(k.startswith("layer1.0.conv1.") for k in keys)


def convert_torchvision_resnet(state_dict):
    """torchvision ResNet/ResNeXt names -> detectron2 ResNet names (pure; see module docstring).

    ``conv1`` / ``bn1`` -> ``stem.conv1`` / ``stem.conv1.norm``; ``layer{i}.{b}.conv{k}`` /
    ``bn{k}`` -> ``res{i+1}.{b}.conv{k}`` / ``conv{k}.norm``; ``downsample.0`` / ``.1`` ->
    ``shortcut`` / ``shortcut.norm``. ``fc.*`` and ``*.num_batches_tracked`` are dropped; other
    keys are kept unchanged.
    """
    out = {}
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked") or key.startswith("fc."):
            continue
        new = key
        if key.startswith("conv1."):
            new = "stem." + key
        elif key.startswith("bn1."):
            new = "stem.conv1.norm." + key[len("bn1.") :]
        else:
            m = _TV_BLOCK.match(key)
            if m:
                stage, block, rest = int(m.group(1)), m.group(2), m.group(3)
                bn, ds = _TV_BN.match(rest), _TV_DOWNSAMPLE.match(rest)
                if bn:
                    rest = f"conv{bn.group(1)}.norm.{bn.group(2)}"
                elif ds:
                    rest = ("shortcut." if ds.group(1) == "0" else "shortcut.norm.") + ds.group(2)
                new = f"res{stage + 1}.{block}.{rest}"
        new, value = _bcn_authors_layout(new, value)
        out[new] = value
    return out


def _bcn_authors_layout(key, value):
    """The BCN authors' ImageNet files (Batch-Channel-Normalization, ``imagenet/models/layers.py``)
    hold each norm as ``<norm>.pbn.*`` (the batch part, a BatchNorm2d) and ``<norm>.weight`` /
    ``.bias`` of shape ``(1, G, 1)`` (the per-group affine): d2norm's BCN names them
    ``<norm>.bn.*`` and ``(G,)``. Other keys are returned unchanged."""
    if ".norm.pbn." in key:
        return key.replace(".norm.pbn.", ".norm.bn."), value
    if (
        key.endswith((".norm.weight", ".norm.bias"))
        and getattr(value, "ndim", 0) == 3
        and value.shape[0] == 1
        and value.shape[2] == 1
    ):
        return key, value.reshape(-1)
    return key, value


_D2_BLOCK = re.compile(r"^res(\d+)\.(\d+)\.(.+)$")
_D2_NORM = re.compile(r"^conv(\d+)\.norm\.(.+)$")


def to_torchvision_resnet(state_dict):
    """detectron2 ResNet names -> torchvision's (the inverse of :func:`convert_torchvision_resnet`
    on the keys it renames; pure). A parametrized conv's raw weight
    ``X.parametrizations.weight.original`` is written as ``X.weight``, the way files trained with
    Weight Standardization / centralization store it; other keys (a classifier ``fc.*``) are kept.
    """
    out = {}
    for key, value in state_dict.items():
        key = plain_weight_key(key)
        new = key
        if key.startswith("stem.conv1.norm."):
            new = "bn1." + key[len("stem.conv1.norm.") :]
        elif key.startswith("stem.conv1."):
            new = key[len("stem.") :]
        else:
            m = _D2_BLOCK.match(key)
            if m:
                stage, block, rest = int(m.group(1)), m.group(2), m.group(3)
                norm = _D2_NORM.match(rest)
                if norm:
                    rest = f"bn{norm.group(1)}.{norm.group(2)}"
                elif rest.startswith("shortcut.norm."):
                    rest = "downsample.1." + rest[len("shortcut.norm.") :]
                elif rest.startswith("shortcut."):
                    rest = "downsample.0." + rest[len("shortcut.") :]
                new = f"layer{stage - 1}.{block}.{rest}"
        if new in out:
            raise ValueError(f"to_torchvision_resnet: two keys map to {new!r}")
        out[new] = value
    return out


def _is_tensor_dict(d):
    return isinstance(d, dict) and d and all(hasattr(v, "shape") for v in d.values())


def normalize_loaded_checkpoint(checkpoint, filename=""):
    """Bring a loaded file (``{"model": ..., ...}`` as detectron2's checkpointer returns it) to
    detectron2's expectations: unwrap ``state_dict`` / nested ``model`` containers, strip a
    ``module.`` prefix, convert torchvision ResNet names, mark Caffe2-named dicts for name
    matching. Returns the (modified) ``checkpoint``."""
    model = checkpoint.get("model")
    for _ in range(3):  # {"state_dict": sd, "epoch": ...} / {"model": sd} wrappers
        if isinstance(model, dict) and not _is_tensor_dict(model):
            inner = next(
                (model[k] for k in ("state_dict", "model", "blobs") if isinstance(model.get(k), dict)), None
            )
            if inner is None:
                break
            model = inner
        else:
            break
    if not isinstance(model, dict):
        return checkpoint
    if checkpoint.get("__author__") == "Caffe2":
        model = {k: v for k, v in model.items() if not k.endswith("_momentum")}
        checkpoint.setdefault("matching_heuristics", True)
    model = _strip_prefix(model, "module.")
    if is_torchvision_resnet(model):
        dropped = sorted(k for k in model if k.startswith("fc."))
        model = convert_torchvision_resnet(model)
        logger.info(
            "%s: torchvision-style ResNet weights, renamed to detectron2 names%s.",
            filename or "weights",
            f" (classifier {', '.join(dropped)} dropped)" if dropped else "",
        )
        checkpoint["__author__"] = "torchvision"
        checkpoint["matching_heuristics"] = True
    checkpoint["model"] = model
    return checkpoint


def _bottom_up(model):
    """(prefix, module) of the backbone's bottom-up network, or (None, None)."""
    backbone = getattr(model, "backbone", None)
    if backbone is None:
        return None, None
    target = getattr(backbone, "bottom_up", backbone)
    for name, module in model.named_modules():
        if module is target:
            return (name + ".") if name else "", module
    return None, None


_NORM_TENSORS = ("weight", "bias", "running_mean", "running_var")


def _squeezed(shape):
    return [d for d in shape if d != 1]


def split_method_history(state_dict, model_keys):
    """Take the norms' method history (each :class:`~d2norm.norms.NormSpec`'s ``history``
    buffers) out of a file read by detectron2's name matching (torchvision / Caffe2-style keys),
    keyed by the one model key that ends with each file key; the rest is returned unchanged.

    detectron2's matching drops a tensor whose shape differs from the model's, so a history of
    another buffer size (a backbone pretrained with MABN at a large batch, buffer 1, fine-tuned
    with the recipe's 16) would never reach :func:`adapt_method_state`, which restarts it with a
    warning, and the load would fail as "the file is for another backbone". Pure: returns
    ``(rest, history)``; a file key no model key ends with, or more than one, stays in ``rest``."""
    leaves = {leaf for spec in NORMS.values() for leaf in spec.history}
    model_keys = list(model_keys)
    rest, history = {}, {}
    for key, value in state_dict.items():
        if key.rsplit(".", 1)[-1] in leaves:
            owners = [m for m in model_keys if m == key or m.endswith("." + key)]
            if len(owners) == 1:
                history[owners[0]] = value
                continue
        rest[key] = value
    return rest, history


def adapt_method_state(model, state_dict):
    """Convert the norm state in ``state_dict`` to ``model``'s layout, in place, before shapes
    are compared (see the module docstring). Returns one message per converted layer."""
    notes = []
    norm_types = norm_layer_types()
    for name, module in model.named_modules():
        if not isinstance(module, norm_types):
            continue
        prefix = f"{name}." if name else ""
        mine = dict(module.named_buffers(recurse=False))
        mine.update(module.named_parameters(recurse=False))
        reshaped = []
        for leaf in _NORM_TENSORS + ("iters",):
            key, target = prefix + leaf, mine.get(leaf)
            value = state_dict.get(key)
            if (
                isinstance(value, torch.Tensor)
                and target is not None
                and value.shape != target.shape
                and _squeezed(value.shape) == _squeezed(target.shape)
            ):
                state_dict[key] = value.reshape(target.shape)
                reshaped.append(f"{leaf} {tuple(value.shape)} -> {tuple(target.shape)}")
        if reshaped:
            notes.append(f"{prefix[:-1]}: reshaped {', '.join(reshaped)}")
        spec = spec_of(module)
        misfit = _misfits(state_dict, prefix, mine, spec.history) if spec is not None else ""
        if misfit:
            for leaf in spec.history:
                state_dict.pop(prefix + leaf, None)
            for leaf in spec.history_counters:
                state_dict[prefix + leaf] = torch.zeros_like(mine[leaf])
            sizes = ", ".join(
                f"D2NORM.{k}={getattr(module, kw)}" for kw, k in spec.options.items() if hasattr(module, kw)
            )
            notes.append(
                f"{prefix[:-1]}: {spec.name} history of the file ({misfit}) does not fit this layer "
                f"({sizes}; its conv); it restarts ({', '.join(spec.history_counters)} set to 0; "
                "running statistics and the affine parameters are loaded)"
            )
    for note in notes:
        logger.warning("%s", note)
    return notes


def _misfits(state_dict, prefix, mine, leaves):
    """``"name: file shape vs layer shape"`` for the history buffers of another shape."""
    out = []
    for leaf in leaves:
        value, target = state_dict.get(prefix + leaf), mine.get(leaf)
        if (
            isinstance(value, torch.Tensor)
            and target is not None
            and target.numel() > 0
            and value.shape != target.shape
        ):
            out.append(f"{leaf} {tuple(value.shape)} vs {tuple(target.shape)}")
    return "; ".join(out)


def _short_list(keys, limit=12):
    keys = sorted(keys)
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_loaded_weights(model, path, file_shapes, incompatible, strict_backbone=True, adapted=()):
    """Apply the rules of the module docstring after ``model`` was loaded from ``path``.

    ``file_shapes``: ``{key: shape}`` of the state dict handed to ``load_state_dict`` (after
    renaming/matching); ``incompatible``: fvcore's result (missing_keys, unexpected_keys,
    incorrect_shapes); ``adapted``: the messages of :func:`adapt_method_state`. Raises
    :class:`CheckpointError`; returns a :class:`LoadReport`.
    """
    file_shapes = _strip_prefix(dict(file_shapes), "module.")
    model_sd = model.state_dict()
    bad_shapes = {k for k, *_ in getattr(incompatible, "incorrect_shapes", [])}
    loaded = {k for k in file_shapes if k in model_sd and k not in bad_shapes}
    unused = sorted(k for k in file_shapes if k not in model_sd)
    path_s = repr(path)

    if file_shapes and not loaded:
        model_keys = sorted(k for k in model_sd if not k.startswith("pixel_"))
        raise CheckpointError(
            f"None of the {len(file_shapes)} tensors in {path_s} matches the model "
            f"(MODEL.WEIGHTS). File keys: {_short_list(file_shapes, 8)}. Model keys look like: "
            f"{_short_list(model_keys, 6)}. Fix: point MODEL.WEIGHTS at weights of this "
            "architecture: a detectron2/d2norm checkpoint, a Detectron/detectron2 .pkl (Caffe2 "
            "names like res2_0_branch2a_w), or a torchvision-style ResNet state dict "
            '(conv1.weight, layer1.0.conv1.weight, ...); or set MODEL.WEIGHTS "" to train '
            "from scratch."
        )

    prefix, bottom_up = _bottom_up(model)
    backbone_loaded = sorted(k for k in loaded if prefix is not None and k.startswith(prefix))
    report = LoadReport(path, sorted(loaded), backbone_loaded, unused, tuple(adapted))
    if not strict_backbone or prefix is None:
        return report

    # rule 2: shape mismatches in the bottom-up network
    mismatches = [
        (k, tuple(shape_file), tuple(shape_model))
        for k, shape_file, shape_model in getattr(incompatible, "incorrect_shapes", [])
        if k.startswith(prefix)
    ]
    plain_bottom = {plain_weight_key(k): k for k in model_sd if k.startswith(prefix)}
    for k in unused:  # name matching dropped them (detectron2 only logs a warning)
        if k.startswith(prefix):
            continue
        hits = [m for m in plain_bottom if m == k or m.endswith("." + k)]
        if hits:
            target = max(hits, key=len)
            model_shape = tuple(model_sd[plain_bottom[target]].shape)
            if tuple(file_shapes[k]) != model_shape:
                mismatches.append((f"{k} -> {target}", tuple(file_shapes[k]), model_shape))
    if mismatches:
        lines = "; ".join(f"{k}: file {f} vs model {m}" for k, f, m in mismatches[:10])
        more = f" ... ({len(mismatches) - 10} more)" if len(mismatches) > 10 else ""
        raise CheckpointError(
            f"{len(mismatches)} backbone tensor(s) in {path_s} have the wrong shape for this "
            f"model: {lines}{more}. The file is for another backbone (depth, width, groups). "
            "Fix: use weights of the backbone in MODEL.RESNETS (DEPTH, NUM_GROUPS, "
            "WIDTH_PER_GROUP, RES2_OUT_CHANNELS), or change those keys to match the file."
        )

    # rule 3: bottom-up parameters the file does not provide
    if backbone_loaded:
        params = {prefix + n for n, _ in bottom_up.named_parameters()}
        missing = sorted(
            plain_weight_key(k)
            for k in incompatible.missing_keys
            if k in params and not any(e in k for e in _EXEMPT_MISSING)
        )
        if missing:
            raise CheckpointError(
                f"{path_s} provides {len(backbone_loaded)} backbone tensors but not these "
                f"{len(missing)} backbone parameters: {_short_list(missing)}. The file is for a "
                "shallower or different backbone. Fix: use weights of the backbone in "
                "MODEL.RESNETS (DEPTH, NUM_GROUPS, WIDTH_PER_GROUP), or set "
                "D2NormCheckpointer.strict_backbone = False to train the missing layers from "
                "random init."
            )
    return report
