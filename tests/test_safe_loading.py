"""Weights files cannot run code: a ``.pkl`` or ``.pth`` with a ``__reduce__`` payload is refused
before the payload runs (the payload would create a file; a plain ``pickle.load`` of the same file
does, the control), while files in the layouts the recipes name (Detectron / MSRA ImageNet
``.pkl`` written by Python 2, detectron2 model-zoo ``.pkl``, any pickle protocol) still load."""

import collections
import pickle
import struct

import numpy as np
import pytest
import torch
from torch import nn

from d2norm.checkpoint import CheckpointError, D2NormCheckpointer, read_weights_file


class _Payload:
    """Unpickling this creates the file ``path`` (``open(path, "w")``)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _malicious_state(marker, weight):
    return {"model": {"w": weight, "x": _Payload(marker)}, "__author__": "x"}


@pytest.mark.parametrize("protocol", [2, 4])
def test_malicious_pkl_is_refused_before_its_payload_runs(tmp_path, protocol):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "R-50.pkl"
    path.write_bytes(pickle.dumps(_malicious_state(marker, np.ones(3, np.float32)), protocol=protocol))
    with pytest.raises(CheckpointError) as info:
        D2NormCheckpointer(nn.Linear(3, 1)).load(str(path))
    assert not marker.exists()
    message = str(info.value)
    assert str(path) in message and "'io.open'" in message and "Fix" in message
    # control: the payload is real, plain pickle runs it
    with open(path, "rb") as f:
        pickle.load(f)
    assert marker.exists()


def test_malicious_pth_is_refused_before_its_payload_runs(tmp_path):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "model_final.pth"
    torch.save(_malicious_state(marker, torch.ones(3)), str(path))
    with pytest.raises(CheckpointError) as info:
        D2NormCheckpointer(nn.Linear(3, 1)).load(str(path))
    assert not marker.exists()
    message = str(info.value)
    assert str(path) in message and "Refusing to read" in message and "open" in message, message
    torch.load(str(path), weights_only=False)  # control
    assert marker.exists()


# ---------------------------------------------------------------- real layouts still load
def _py2_array(values, shape):
    """A float32 ndarray as Python 2's cPickle (protocol 2) and numpy 1.x wrote it, opcode by
    opcode: _reconstruct(ndarray, (0,), 'b') then BUILD with (1, shape, dtype('f4'), False,
    <raw bytes as a Python 2 str>)."""
    data = struct.pack(f"<{len(values)}f", *values)
    shape_ops = b"".join(b"K" + bytes([n]) for n in shape) + {1: b"\x85", 2: b"\x86"}[len(shape)]
    return (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R"
        + b"(K\x01"
        + shape_ops
        + b"cnumpy\ndtype\nU\x02f4K\x00K\x01\x87R"
        + b"(K\x03U\x01<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
        + b"\x89"
        + b"T"
        + struct.pack("<I", len(data))
        + data
        + b"tb"
    )


def _py2_dict(items):
    """``{key: value}`` as Python 2 pickled it (keys are Python 2 str); values are opcodes."""
    body = b"".join(b"U" + bytes([len(k)]) + k.encode() + v for k, v in items.items())
    return b"}(" + body + b"u"


def test_python2_detectron_pkl_loads(tmp_path):
    """MSRA / FAIR ImageNet files (``{blob: ndarray}``) and Detectron model files
    (``{"blobs": ..., "cfg": <yaml>}``), written by Python 2."""
    w = [0.5, -1.25, 3.0, 2.0, 0.0, -7.5]
    blobs = {
        "conv1_w": _py2_array(w, (2, 3)),
        "res_conv1_bn_s": _py2_array([1.0, 2.0], (2,)),
        "conv1_w_momentum": _py2_array([9.0] * 6, (2, 3)),
    }
    plain = tmp_path / "R-50.pkl"
    plain.write_bytes(b"\x80\x02" + _py2_dict(blobs) + b".")
    detectron = tmp_path / "model_final.pkl"
    cfg_text = b"U\x0aMODEL: {}\n"  # the config as YAML text
    detectron.write_bytes(b"\x80\x02}(U\x05blobs" + _py2_dict(blobs) + b"U\x03cfg" + cfg_text + b"u.")
    for path in (plain, detectron):
        loaded = read_weights_file(str(path))
        assert loaded["__author__"] == "Caffe2" and loaded["matching_heuristics"] is True
        model = loaded["model"]
        assert sorted(model) == ["conv1_w", "res_conv1_bn_s"]  # *_momentum dropped
        assert model["conv1_w"].dtype == np.float32
        assert np.array_equal(model["conv1_w"], np.array(w, np.float32).reshape(2, 3))
        assert np.array_equal(model["res_conv1_bn_s"], np.array([1.0, 2.0], np.float32))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_detectron2_model_zoo_pkl_loads_in_every_protocol(tmp_path, protocol):
    """``{"model": {name: ndarray}, "__author__": ..., "matching_heuristics": bool}`` (model zoo,
    convert-torchvision-to-d2.py), also in an OrderedDict, with numpy scalars and int arrays."""
    rng = np.random.default_rng(0)
    arrays = collections.OrderedDict(
        [
            ("backbone.bottom_up.stem.conv1.weight", rng.standard_normal((4, 3, 3, 3)).astype(np.float32)),
            ("roi_heads.box_predictor.cls_score.bias", rng.standard_normal(5)),
            ("num_batches_tracked", np.array(7, np.int64)),
            ("fortran", np.asfortranarray(rng.standard_normal((3, 2)).astype(np.float32))),
        ]
    )
    data = {"model": arrays, "__author__": "Detectron2 Model Zoo", "matching_heuristics": True}
    data["scale"] = np.float32(0.5)
    path = tmp_path / "model_final_abc.pkl"
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    loaded = read_weights_file(str(path))
    assert loaded["__author__"] == "Detectron2 Model Zoo" and loaded["scale"] == np.float32(0.5)
    assert list(loaded["model"]) == list(arrays)
    for k, v in arrays.items():
        assert loaded["model"][k].dtype == v.dtype and np.array_equal(loaded["model"][k], v), k


def test_torch_tensors_in_a_pkl_are_refused(tmp_path):
    """A ``torch.save`` file renamed ``.pkl`` / a pickle of tensors: not a weights layout."""
    path = tmp_path / "weights.pkl"
    path.write_bytes(pickle.dumps({"model": {"w": torch.ones(2)}}))
    with pytest.raises(CheckpointError, match="torch"):
        D2NormCheckpointer(nn.Linear(3, 1)).load(str(path))
