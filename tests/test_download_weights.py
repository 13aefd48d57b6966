"""d2norm.download / tools/download_weights.py: fetching a recipe's pretrained file with its
published checksum verified, from local file:// URLs and a replaced opener (no internet)."""

import glob
import hashlib
import importlib.util
import io
import os

import pytest
import yaml
from helpers import CONFIGS, REPO

from d2norm.download import (
    PRETRAINED,
    ChecksumError,
    NotDownloadableError,
    PretrainedFile,
    download,
    fetch,
    resolve,
)

CONTENT = b"pretrained weights, as bytes" * 1000


def _serve(tmp_path, content=CONTENT, name="served.bin"):
    src = tmp_path / name
    src.write_bytes(content)
    return src.as_uri()


def _never(url):
    raise AssertionError(f"downloaded {url} again")


def test_download_verifies_the_published_checksum_and_never_fetches_a_verified_file_again(tmp_path):
    sha = hashlib.sha256(CONTENT).hexdigest()
    entry = PretrainedFile(f"model-{sha[:8]}.pth", _serve(tmp_path), sha[:8], "test: in the name")
    dest = str(tmp_path / "root" / entry.path)
    lines = []
    result = fetch(entry, dest, log=lines.append)
    assert result == {"path": dest, "sha256": sha, "verified": True, "downloaded": True}
    assert open(dest, "rb").read() == CONTENT and not os.path.exists(dest + ".part")
    assert "verified against the published checksum" in lines[-1]
    again = fetch(entry, dest, opener=_never, log=lines.append)
    assert again["downloaded"] is False and again["verified"] is True
    assert "present, not downloaded again" in lines[-1]


def test_a_mismatch_is_refused_and_nothing_is_left_in_place(tmp_path):
    # the real torchvision entry, served from a mirror with other bytes
    entry = PRETRAINED["resnet50-19c8e357.pth"]
    mirror = _serve(tmp_path)
    root = tmp_path / "root"
    with pytest.raises(ChecksumError, match=r"published checksum of resnet50-19c8e357\.pth is 19c8e357"):
        download("resnet50-19c8e357.pth", root=str(root), url=mirror, log=lambda s: None)
    assert not os.path.exists(root / entry.path) and not os.path.exists(str(root / entry.path) + ".part")
    # a file already in place that does not match is refused too, not replaced
    (root / "pretrained").mkdir(parents=True, exist_ok=True)
    (root / entry.path).write_bytes(CONTENT)
    with pytest.raises(ChecksumError, match=r"already present.*Fix: delete"):
        download("pretrained/resnet50-19c8e357.pth", root=str(root), opener=_never, log=lambda s: None)
    assert (root / entry.path).read_bytes() == CONTENT


def test_files_without_a_published_checksum_print_their_sha256(tmp_path):
    served = {}

    def opener(url):  # what urlopen returns: a context manager with read()
        served["url"] = url
        return io.BytesIO(CONTENT)

    lines = []
    result = download("R-50.pkl", root=str(tmp_path), opener=opener, log=lines.append)
    assert served["url"] == "https://dl.fbaipublicfiles.com/detectron/ImageNetPretrained/MSRA/R-50.pkl"
    assert result["verified"] is None and result["sha256"] == hashlib.sha256(CONTENT).hexdigest()
    assert f"SHA-256 {result['sha256']}" in lines[-1] and "no checksum is published" in lines[-1]
    assert download("R-50.pkl", root=str(tmp_path), opener=_never, log=lines.append)["downloaded"] is False


def test_files_without_a_download_say_how_to_get_them(tmp_path):
    with pytest.raises(NotDownloadableError, match=r"R50-wc\.pth.*megvii-model/MABN"):
        download("R50-wc.pth", root=str(tmp_path))
    with pytest.raises(NotDownloadableError, match="no public file is known"):
        download("COCO-Detection/faster_rcnn_R_101_FPN_2x_mabn.yaml", root=str(tmp_path))
    with pytest.raises(ValueError, match="Unknown pretrained file 'R-18.pkl'"):
        download("R-18.pkl", root=str(tmp_path))


def test_every_recipe_file_is_in_the_catalog():
    """Each COCO recipe's MODEL.WEIGHTS (read from the YAML files themselves) has an entry, and a
    recipe name resolves to it."""
    seen = set()
    for path in glob.glob(os.path.join(CONFIGS, "COCO-*", "*.yaml")):
        with open(path) as f:
            weights = (yaml.safe_load(f).get("MODEL") or {}).get("WEIGHTS")
        if weights:
            assert weights.startswith("pretrained/"), path
            assert os.path.basename(weights) in PRETRAINED, path
            seen.add(os.path.basename(weights))
    assert seen <= set(PRETRAINED) and len(seen) >= 15
    cbn = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_cbn.yaml"
    assert resolve(cbn) is PRETRAINED["resnet50-19c8e357.pth"]


def test_tool_command_line(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "download_tool", os.path.join(REPO, "tools", "download_weights.py")
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.main(["--list"])
    listed = capsys.readouterr().out
    assert "pretrained/R-50-GN-WS.pth: https://download.openmmlab.com/" in listed
    mirror = _serve(tmp_path)
    (result,) = tool.main(["R-101.pkl", "--root", str(tmp_path), "--url", mirror])
    assert result["downloaded"] and os.path.isfile(tmp_path / "pretrained" / "R-101.pkl")
    assert "no checksum is published" in capsys.readouterr().out
