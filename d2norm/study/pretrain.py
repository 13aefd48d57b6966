"""Pretraining the study backbone on the upstream task, as ImageNet pretraining is done, scaled down.

The backbone is the one a fine-tuning config builds (``build_resnet_backbone`` of that config:
ResNet-18 stem + res2-res4 for the study's twins, ``configs/synthetic/finetune/``) with the
variant's norm in every stage and nothing frozen, followed by global average pooling and a
linear classifier over the 64 upstream classes (:mod:`d2norm.data.upstream_shapes`). It trains
at a large batch (default 64 images per iteration, one process: the norm sees all of them) with
SGD (momentum 0.9, weight decay 1e-4, none on norm parameters), a linear warm-up and a cosine
decay, on the unbounded upstream stream (iteration ``t`` trains images ``t·batch`` ..
``(t+1)·batch − 1``), with the input convention the fine-tuning config states
(``INPUT.FORMAT``, ``MODEL.PIXEL_MEAN`` / ``PIXEL_STD``).

Variants (:data:`VARIANTS`): the norm the backbone is pretrained with, as the published files
were:

* ``BN``: BatchNorm, the ImageNet files of torchvision / MSRA; fine-tuned as BN* (FrozenBN),
  FrozenStatsBN, SyncBN and the CBN recipes' frozen-statistics backbone;
* ``GN``: GroupNorm (detectron2's ``ImageNetPretrained/FAIR/R-50-GN.pkl``); the GN recipes;
* ``GN+WS``: GroupNorm + Weight Standardization (the WS authors' files); the GN+WS recipes;
* ``MABN``: MABN with weight-centralized convs. MABN's official detection configs fine-tune from
  ``R50-wc.pth``, the MABN authors' ImageNet R-50 whose convs are weight-centralized and whose
  norm state (``running_var`` as (1, C, 1, 1), ``iters``) is MABN's (:mod:`d2norm.weights`
  reads that layout), i.e. a backbone pretrained with MABN itself. At the pretraining batch the
  buffer is 1 iteration (the paper's buffer = simulated / real batch, here 64 / 64).
* ``BCN+WS``: BCN after weight-standardized convs in *large-batch* mode (``D2NORM.BCN.MODE
  "batch"``: the batch part normalizes with the 64 images' statistics, as BN, while its running
  statistics move at a constant rate 0.1). The BCN+WS COCO recipe fine-tunes from the BCN
  authors' ImageNet ``rn50_bcn_ws.pth`` (Batch-Channel-Normalization @0244c3e,
  ``imagenet/README.md``), trained by ``imagenet/models/layers.py``, whose norm is a
  ``nn.BatchNorm2d`` (``pbn``: batch statistics, momentum 0.1) followed by the channel
  normalization with one affine per group, after ``Conv2d`` with ``(W − mean)/√(var_unbiased +
  1e-5)``: the large-batch BCN, not the micro-batch estimates the recipe then fine-tunes with. The
  groups, ε, affine and WS convention are the recipe's (the twin's config); the file stores the
  batch part as ``bn*.bn.*`` and the affine as ``(G,)``, d2norm's layout, which
  ``MODEL.WEIGHTS`` reads like the authors' renamed one.

The checkpoint is a torchvision-style ResNet state dict (``conv1.weight``, ``bn1.*``,
``layer1.0.conv1.weight``, ``layer3.0.downsample.1.*``, ..., ``fc.*``), the layout of
``resnet50-19c8e357.pth`` and of the WS / MABN authors' files, so fine-tuning loads it through
``MODEL.WEIGHTS`` and :class:`d2norm.checkpoint.D2NormCheckpointer`, the code path of the COCO
recipes' real weights. A JSON file beside it holds the settings, the upstream accuracy and the
cost. Files are cached under ``<data root>/pretrained/`` keyed by a hash of the settings (the
merged config's backbone and input keys, the generator version), so a second call returns the
cached file; the same settings on the same machine give the same file (fixed seeds, 1 thread).
"""

import dataclasses
import hashlib
import json
import math
import os
import time

__all__ = [
    "VARIANTS",
    "PretrainSettings",
    "pretrain_cfg",
    "build_pretrain_net",
    "checkpoint_path",
    "pretrain",
    "load_or_pretrain",
    "upstream_accuracy",
]

#: variant -> the norm of every backbone stage during pretraining (and the D2NORM options)
#: ``sections``: the D2NORM options the variant's norm reads (part of the cache key)
VARIANTS = {
    "BN": dict(norm="BN", sections=()),
    "GN": dict(norm="GN", sections=("GN",)),
    "GN+WS": dict(norm="GN+WS", sections=("GN", "WS")),
    "MABN": dict(
        norm="MABN",
        sections=("MABN",),
        opts=("D2NORM.MABN.BUFFER_SIZE", "1", "D2NORM.MABN.WARMUP_ITERS", "0"),
    ),
    "BCN+WS": dict(
        norm="BCN+WS",
        sections=("BCN", "WS"),
        opts=("D2NORM.BCN.MODE", "batch", "D2NORM.BCN.MOVING_SPEED_SCHEDULE", "constant"),
    ),
}
PRETRAIN_VERSION = 1
#: in the cache key of a variant whose norm options are not d2norm's defaults (GN+WS: the
#: recipe's WS convention; MABN: buffer 1, no warm-up; BCN+WS): files of version 1 built the
#: backbone from the norm names alone, so such a variant's layers took the defaults
OPTIONS_VERSION = 2


@dataclasses.dataclass
class PretrainSettings:
    """One pretraining run (see the module docstring)."""

    variant: str
    config: str  # the fine-tuning config whose backbone and input convention are pretrained
    iters: int = 1500
    batch: int = 64
    lr: float = 0.1
    weight_decay: float = 1e-4
    warmup_frac: float = 0.05
    size: int = 64
    seed: int = 0
    threads: int = 1
    val_images: int = 1024
    data_root: str = ""

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(
                f"Unknown pretraining variant {self.variant!r}. Fix: use one of {', '.join(VARIANTS)}."
            )
        if self.iters < 1 or self.batch < 2:
            raise ValueError(f"--iters must be >= 1 and --batch >= 2, got {self.iters}, {self.batch}")


def pretrain_cfg(s):
    """The config the backbone is built from: ``s.config`` with the variant's norm in every
    ResNet stage, nothing frozen, and the variant's options."""
    from detectron2.config import get_cfg

    from .. import add_d2norm_config

    if not os.path.isfile(s.config):
        raise FileNotFoundError(
            f"Fine-tuning config not found: {s.config!r}. Fix: pass one of configs/synthetic/finetune/*.yaml."
        )
    cfg = get_cfg()
    add_d2norm_config(cfg)
    cfg.merge_from_file(s.config)
    cfg.MODEL.RESNETS.NORM = VARIANTS[s.variant]["norm"]
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.merge_from_list(list(VARIANTS[s.variant].get("opts", ())))
    return cfg


def _settings_key(s, cfg):
    keys = {
        "settings": {k: v for k, v in dataclasses.asdict(s).items() if k not in ("config", "data_root")},
        "resnets": cfg.MODEL.RESNETS.dump(),
        "norms": {
            k: sorted((n, str(v)) for n, v in cfg.D2NORM[k].items()) for k in VARIANTS[s.variant]["sections"]
        },
        "input": [cfg.INPUT.FORMAT, list(cfg.MODEL.PIXEL_MEAN), list(cfg.MODEL.PIXEL_STD)],
        "versions": [PRETRAIN_VERSION, _upstream().UPSTREAM_VERSION],
    }
    if _has_non_default_options(cfg, VARIANTS[s.variant]["sections"]):
        keys["options_version"] = OPTIONS_VERSION
    return hashlib.sha1(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:10]


def _has_non_default_options(cfg, sections):
    """Whether any ``cfg.D2NORM.<section>`` of ``sections`` differs from d2norm's defaults."""
    from detectron2.config import CfgNode

    from .. import add_d2norm_config

    defaults = add_d2norm_config(CfgNode()).D2NORM
    return any(cfg.D2NORM[k] != defaults[k] for k in sections)


def _upstream():
    from ..data import upstream_shapes

    return upstream_shapes


def checkpoint_path(s, cfg=None):
    """``<data root>/pretrained/study_R18_<variant>_<settings hash>.pth``."""
    from ..data.synthetic_shapes import default_data_root

    cfg = cfg or pretrain_cfg(s)
    root = s.data_root or cfg.D2NORM.DATA.ROOT or default_data_root()
    name = f"study_R{cfg.MODEL.RESNETS.DEPTH}_{s.variant.replace('+', '_')}_{_settings_key(s, cfg)}.pth"
    return os.path.join(root, "pretrained", name)


def _torch_net():
    import torch
    from torch import nn

    class PretrainNet(nn.Module):
        """backbone (a detectron2 ResNet) -> global average pool of its last output -> linear."""

        def __init__(self, cfg, num_classes):
            super().__init__()
            from detectron2.layers import ShapeSpec
            from detectron2.modeling.backbone.resnet import build_resnet_backbone

            from .. import bind_norms, prepare_model
            from ..modeling.prepare import check_norm_options

            # the norm names bound to cfg.D2NORM's options (the variant's mode, buffer, WS
            # convention), as d2norm.build_model does for the fine-tuning model
            self.backbone = prepare_model(build_resnet_backbone(bind_norms(cfg), ShapeSpec(channels=3)))
            check_norm_options(self.backbone, cfg)
            self.last = cfg.MODEL.RESNETS.OUT_FEATURES[-1]
            channels = self.backbone.output_shape()[self.last].channels
            self.fc = nn.Linear(channels, num_classes)
            self.register_buffer("pixel_mean", torch.tensor(cfg.MODEL.PIXEL_MEAN).view(1, 3, 1, 1), False)
            self.register_buffer("pixel_std", torch.tensor(cfg.MODEL.PIXEL_STD).view(1, 3, 1, 1), False)
            self.rgb = cfg.INPUT.FORMAT == "RGB"

        def preprocess(self, images_bgr):
            """N×H×W×3 uint8 BGR (numpy) -> the normalized N×3×H×W tensor of the config's convention."""
            x = torch.from_numpy(images_bgr).permute(0, 3, 1, 2).float()
            if self.rgb:
                x = x.flip(1)
            return (x - self.pixel_mean) / self.pixel_std

        def forward(self, x):
            feat = self.backbone(x)[self.last]
            return self.fc(feat.mean(dim=(2, 3)))

    return PretrainNet


def build_pretrain_net(cfg, num_classes):
    """The classifier pretrained here: ``cfg``'s ResNet, average pooling, a linear layer."""
    return _torch_net()(cfg, num_classes)


def _lr_at(s, it):
    warm = max(1, int(round(s.iters * s.warmup_frac)))
    if it < warm:
        return s.lr * (it + 1) / warm
    return 0.5 * s.lr * (1 + math.cos(math.pi * (it - warm) / max(1, s.iters - warm)))


def upstream_accuracy(net, s, images=None, start=10**8, batch=128):
    """Top-1 accuracy (eval mode) on ``images`` held-out upstream images (indices from ``start``,
    never trained on: training uses indices < iters · batch)."""
    import torch

    up = _upstream()
    n = images or s.val_images
    was = net.training
    net.eval()
    correct = 0
    with torch.no_grad():
        for i in range(start, start + n, batch):
            x, y = up.upstream_batch(i, min(batch, start + n - i), s.size)
            correct += int((net(net.preprocess(x)).argmax(1) == torch.from_numpy(y)).sum())
    net.train(was)
    return correct / n


def pretrain(s, out_path=None, progress=True, log=print):
    """Run the pretraining of ``s``; write the checkpoint (torchvision layout) and its JSON.
    Returns (path, info)."""
    import torch

    from ..checkpoint import atomic_torch_save, atomic_write_bytes
    from ..weights import to_torchvision_resnet

    up = _upstream()
    cfg = pretrain_cfg(s)
    path = out_path or checkpoint_path(s, cfg)
    torch.set_num_threads(s.threads)
    torch.manual_seed(s.seed)
    net = build_pretrain_net(cfg, up.num_upstream_classes())
    net.train()
    from ..optim import get_param_groups

    groups = get_param_groups(net, base_lr=s.lr, weight_decay=s.weight_decay, weight_decay_norm=0.0)
    opt = torch.optim.SGD(groups, lr=s.lr, momentum=0.9)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=s.iters, desc=f"pretrain {s.variant}", unit="it", dynamic_ncols=True)
    t0, cpu0 = time.perf_counter(), time.process_time()
    losses, data_s = [], 0.0
    for it in range(s.iters):
        td = time.perf_counter()
        x, y = up.upstream_batch(it * s.batch, s.batch, s.size)
        x = net.preprocess(x)
        data_s += time.perf_counter() - td
        for g in opt.param_groups:
            g["lr"] = _lr_at(s, it)  # every group has the base LR (no bias factor)
        loss = torch.nn.functional.cross_entropy(net(x), torch.from_numpy(y))
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"pretraining {s.variant} diverged at iteration {it} (loss {loss.item()}). Fix: lower --lr."
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if bar is not None:
            bar.update(1)
            if it % 10 == 0:
                bar.set_postfix_str(f"loss {sum(losses[-20:]) / len(losses[-20:]):.3f}", refresh=False)
    if bar is not None:
        bar.close()
    train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    acc = upstream_accuracy(net, s)
    state = {k: v.detach().clone() for k, v in net.backbone.state_dict().items()}
    state = to_torchvision_resnet(state)
    state.update({f"fc.{k}": v.detach().clone() for k, v in net.fc.state_dict().items()})
    atomic_torch_save(state, path)
    tail = losses[-max(1, len(losses) // 20) :]
    info = dict(
        variant=s.variant,
        settings=dataclasses.asdict(s),
        norm=VARIANTS[s.variant]["norm"],
        classes=up.num_upstream_classes(),
        images_seen=s.iters * s.batch,
        final_loss=sum(tail) / len(tail),
        loss_curve=[
            round(sum(losses[i : i + 50]) / len(losses[i : i + 50]), 4) for i in range(0, len(losses), 50)
        ],
        upstream_top1=acc,
        chance=1.0 / up.num_upstream_classes(),
        train_s=train_s,
        train_cpu_s=train_cpu_s,
        data_s=data_s,
        file=os.path.basename(path),
        input=dict(
            format=cfg.INPUT.FORMAT,
            pixel_mean=list(cfg.MODEL.PIXEL_MEAN),
            pixel_std=list(cfg.MODEL.PIXEL_STD),
        ),
    )
    atomic_write_bytes(path + ".json", lambda f: f.write(json.dumps(info, indent=1).encode()))
    log(
        f"pretrained {s.variant}: {s.iters} it x {s.batch} images, upstream top-1 {acc:.3f} "
        f"(chance {info['chance']:.3f}), {train_s / 60:.1f} min, {train_cpu_s / 60:.1f} CPU min -> {path}"
    )
    return path, info


def load_or_pretrain(s, progress=True, log=print):
    """The cached checkpoint of ``s`` (pretraining it first if it is not there): (path, info)."""
    path = checkpoint_path(s)
    if os.path.isfile(path) and os.path.isfile(path + ".json"):
        with open(path + ".json") as f:
            return path, json.load(f)
    return pretrain(s, path, progress, log)
