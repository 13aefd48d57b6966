"""Fetching the pretrained file a recipe expects, with the published checksum verified.

Every COCO recipe names its file as ``MODEL.WEIGHTS: "pretrained/<file>"`` (docs/weights.md);
:data:`PRETRAINED` lists each such file: where it is published, and the checksum published with
it. A checksum counts as published when the publisher puts it in the file name: torchvision's
files (``resnet50-19c8e357.pth``: the first 8 hex digits of the file's SHA-256, which
``torch.hub`` checks) and OpenMMLab's (``resnet50_gn_ws-15beedd8.pth``: the same convention,
written by mmdetection's ``tools/publish_model.py``). Detectron's ``.pkl`` files have none: their
SHA-256 is computed and printed, and said to be unverified.

:func:`download` (``tools/download_weights.py``):

* a file already in place is never downloaded again: it is verified (where a checksum is
  published) or its SHA-256 printed, and a file that fails verification is refused, not
  replaced (delete it to fetch it again);
* a download goes to ``<file>.part`` next to the target and is renamed into place only after
  it verifies; a mismatch deletes it and raises :class:`ChecksumError` with both checksums;
* files with no public download (no direct link, or no public file at all) raise
  :class:`NotDownloadableError` saying how to obtain them.
"""

import hashlib
import os
import re
import urllib.request
from dataclasses import dataclass

__all__ = [
    "PretrainedFile",
    "PRETRAINED",
    "ChecksumError",
    "NotDownloadableError",
    "resolve",
    "sha256_of",
    "fetch",
    "download",
]

_FAIR = "https://dl.fbaipublicfiles.com/detectron/ImageNetPretrained/"
_TORCHVISION = "https://download.pytorch.org/models/"
_OPENMMLAB = "https://download.openmmlab.com/pretrain/third_party/"  # mmcv model_zoo/open_mmlab.json
_IN_NAME_TV = "torchvision: the first 8 hex digits of the SHA-256 in the file name"
_IN_NAME_MM = "OpenMMLab: the first 8 hex digits of the SHA-256 in the file name"
_NO_PUBLIC = "no public file is known: train it, or obtain it, and put it at this path"


class ChecksumError(RuntimeError):
    """A downloaded or present file whose SHA-256 differs from the published one."""


class NotDownloadableError(RuntimeError):
    """A file with no direct public download; the message says how to obtain it."""


@dataclass(frozen=True)
class PretrainedFile:
    """A recipe's pretrained file: ``name`` under ``pretrained/``, its ``url`` (None: no direct
    download, see ``how``), the published ``sha256_prefix`` (None: none published) and where
    that checksum comes from."""

    name: str
    url: str = None
    sha256_prefix: str = None
    checksum_source: str = ""
    how: str = ""

    @property
    def path(self):
        return f"pretrained/{self.name}"


def _file(name, url=None, prefix=None, source="", how=""):
    return PretrainedFile(name, url, prefix, source, how)


def _hashed(name, url, source):
    """A file whose published name carries the first 8+ hex digits of its SHA-256."""
    return _file(name, url, re.search(r"-([0-9a-f]{8,})\.pth$", url).group(1), source)


#: The files of the recipes' ``MODEL.WEIGHTS``, by file name.
PRETRAINED = {
    f.name: f
    for f in (
        _file("R-50.pkl", _FAIR + "MSRA/R-50.pkl"),
        _file("R-101.pkl", _FAIR + "MSRA/R-101.pkl"),
        _file("R-50-GN.pkl", _FAIR + "47261647/R-50-GN.pkl"),
        _file("R-101-GN.pkl", _FAIR + "47592356/R-101-GN.pkl"),
        _file("X-101-32x8d.pkl", _FAIR + "20171220/X-101-32x8d.pkl"),
        *(
            _hashed(name, _TORCHVISION + name, _IN_NAME_TV)
            for name in ("resnet50-19c8e357.pth", "resnet101-5d3b4d8f.pth", "resnext101_32x8d-8ba56ff5.pth")
        ),
        # the WS authors' GN+WS backbones as mmdetection's open-mmlab://jhu/* serve them, and
        # open-mmlab://contrib/resnet50_gn
        *(
            _hashed(name, _OPENMMLAB + served, _IN_NAME_MM)
            for name, served in (
                ("R-50-GN-WS.pth", "resnet50_gn_ws-15beedd8.pth"),
                ("R-101-GN-WS.pth", "resnet101_gn_ws-3e3c308c.pth"),
                ("X-50-32x4d-GN-WS.pth", "resnext50_32x4d_gn_ws-0d87ac85.pth"),
                ("X-101-32x4d-GN-WS.pth", "resnext101_32x4d_gn_ws-34ac1a9e.pth"),
                ("R-50-GN-contrib.pth", "resnet50_gn_thangvubk-ad1730dd.pth"),
            )
        ),
        # the BCN authors' BCN+WS R-50 (Batch-Channel-Normalization imagenet/README.md)
        _file("R-50-BCN-WS.pth", "https://cs.jhu.edu/~syqiao/BatchChannelNormalization/rn50_bcn_ws.pth"),
        _file(
            "R50-wc.pth",
            how="the MABN authors' README (github.com/megvii-model/MABN) links it on a file-sharing "
            "page, not as a direct download: download it there by hand and put it at this path",
        ),
        *(
            _file(name, how=_NO_PUBLIC)
            for name in ("R-101-wc.pth", "X-101-32x8d-wc.pth", "X-101-32x8d-GN.pkl", "X-101-32x8d-GN-WS.pth")
        ),
    )
}


def resolve(name):
    """The :class:`PretrainedFile` for ``name``: a file name (``R-50.pkl``), its recipe path
    (``pretrained/R-50.pkl``), or a recipe (``COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml``,
    a d2norm.model_zoo name or a YAML path), whose ``MODEL.WEIGHTS`` is looked up."""
    base = os.path.basename(name)
    if base in PRETRAINED and not name.endswith((".yaml", ".py")):
        return PRETRAINED[base]
    if name.endswith(".yaml"):
        from detectron2.config import get_cfg

        from . import model_zoo
        from .config import add_d2norm_config

        cfg = get_cfg()
        add_d2norm_config(cfg)
        cfg.merge_from_file(name if os.path.isfile(name) else model_zoo.get_config_file(name))
        weights = cfg.MODEL.WEIGHTS
        if not weights:
            raise NotDownloadableError(f"{name} trains from scratch (MODEL.WEIGHTS is empty).")
        if os.path.basename(weights) in PRETRAINED:
            return PRETRAINED[os.path.basename(weights)]
        raise NotDownloadableError(
            f"{name} expects MODEL.WEIGHTS {weights!r}, which is not a known pretrained file "
            f"({sorted(PRETRAINED)}). Fix: bring that file yourself (docs/weights.md)."
        )
    raise ValueError(
        f"Unknown pretrained file {name!r}. Fix: one of {sorted(PRETRAINED)}, their "
        "pretrained/<file> paths, or a recipe name (docs/weights.md)."
    )


def sha256_of(path, chunk=1 << 20):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def _verdict(entry, sha, what):
    """``True`` if ``sha`` matches the published checksum, ``None`` if none is published;
    raises :class:`ChecksumError` on a mismatch."""
    if entry.sha256_prefix is None:
        return None
    if sha.startswith(entry.sha256_prefix):
        return True
    raise ChecksumError(
        f"{what} has SHA-256 {sha}, but the published checksum of {entry.name} is "
        f"{entry.sha256_prefix}... ({entry.checksum_source}). The file is corrupt, truncated, or "
        "another file."
    )


def fetch(entry, path, url=None, opener=None, log=print):
    """Put ``entry``'s file at ``path`` (see the module docstring); ``url`` overrides the
    published address (a mirror; the published checksum still applies), ``opener`` replaces
    ``urllib.request.urlopen``. Returns ``{"path", "sha256", "verified", "downloaded"}``
    (``verified``: True, or None where no checksum is published)."""
    if os.path.isfile(path):
        sha = sha256_of(path)
        try:
            verified = _verdict(entry, sha, f"{path!r} (already present)")
        except ChecksumError as e:
            raise ChecksumError(f"{e} Fix: delete {path!r} and download it again.") from None
        log(_describe(entry, path, sha, verified, "present, not downloaded again"))
        return {"path": path, "sha256": sha, "verified": verified, "downloaded": False}
    url = url or entry.url
    if url is None:
        raise NotDownloadableError(f"{path!r} ({entry.name}) cannot be downloaded: {entry.how}.")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    part = path + ".part"
    digest = hashlib.sha256()
    try:
        with (opener or urllib.request.urlopen)(url) as response, open(part, "wb") as out:
            for block in iter(lambda: response.read(1 << 20), b""):
                digest.update(block)
                out.write(block)
        sha = digest.hexdigest()
        verified = _verdict(entry, sha, f"the download of {url}")
    except BaseException:
        if os.path.exists(part):
            os.unlink(part)
        raise
    os.replace(part, path)
    log(_describe(entry, path, sha, verified, f"downloaded from {url}"))
    return {"path": path, "sha256": sha, "verified": verified, "downloaded": True}


def _describe(entry, path, sha, verified, how):
    check = (
        f"verified against the published checksum ({entry.checksum_source})"
        if verified
        else "no checksum is published for this file, so it is not verified"
    )
    return f"{path}: {how}; SHA-256 {sha}; {check}."


def download(name, root=".", url=None, opener=None, log=print):
    """Fetch the pretrained file of ``name`` (:func:`resolve`) to ``<root>/pretrained/<file>``,
    the path the recipes expect when run from ``root``. See :func:`fetch`."""
    entry = resolve(name)
    return fetch(entry, os.path.join(root, entry.path), url=url, opener=opener, log=log)
