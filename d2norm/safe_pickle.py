"""Reading ``.pkl`` weights without running code from the file.

A pickle names the functions and classes that rebuild its objects (its *globals*), and
``pickle.load`` imports and calls them: a file with a ``__reduce__`` payload runs any code while
it is read. The weights files the recipes name hold only numpy arrays in plain containers:

* Detectron / MSRA / FAIR ImageNet files (``R-50.pkl``, ``R-50-GN.pkl``, ``X-101-32x8d.pkl``),
  written by Python 2: ``{blob name: ndarray}``, or ``{"blobs": {...}, "cfg": "<yaml text>"}``;
* detectron2 model-zoo and converted files (``model_final_*.pkl``, the output of detectron2's
  ``convert-torchvision-to-d2.py``): ``{"model": {name: ndarray}, "__author__": str,
  "matching_heuristics": bool}``.

Their globals are numpy's array / scalar / dtype reconstruction functions (``numpy.core`` before
numpy 2, ``numpy._core`` after), ``collections.OrderedDict``, and, in files written with pickle
protocol 2 by Python 3, ``_codecs.encode(text, "latin1")`` for byte strings.
:func:`load_weights_pickle` admits exactly these (``_codecs.encode`` with the latin-1 codec
only) and refuses any other global with :class:`UnsafePickleError`, naming the file and the
global, before anything from the file runs.
"""

import codecs
import collections
import pickle

import numpy as np

__all__ = ["UnsafePickleError", "load_weights_pickle", "ALLOWED_GLOBALS"]


class UnsafePickleError(pickle.UnpicklingError):
    """A ``.pkl`` file that needs a global outside :data:`ALLOWED_GLOBALS`."""


def _latin1_encode(text, encoding="utf-8", errors="strict"):
    """``_codecs.encode`` as protocol-2 pickles use it: ``(str, "latin1")`` to bytes, nothing else."""
    if not isinstance(text, str) or codecs.lookup(encoding).name != "iso8859-1":
        raise UnsafePickleError(
            f"_codecs.encode called with ({type(text).__name__}, {encoding!r}); weights files "
            "use it only as (str, 'latin1')"
        )
    return text.encode("latin-1", errors)


def _numpy_globals():
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric

    names = {
        "multiarray._reconstruct": multiarray._reconstruct,
        "multiarray.scalar": multiarray.scalar,
        "numeric._frombuffer": getattr(numeric, "_frombuffer", None),
    }
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for core in ("numpy.core", "numpy._core"):  # numpy < 2 and >= 2 write different module names
        for name, obj in names.items():
            module, attr = name.split(".")
            if obj is not None:
                allowed[(f"{core}.{module}", attr)] = obj
    return allowed


#: ``(module, name)`` -> the object a weights pickle may refer to.
ALLOWED_GLOBALS = {
    **_numpy_globals(),
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("_codecs", "encode"): _latin1_encode,
}


class _WeightsUnpickler(pickle.Unpickler):
    def __init__(self, file, path):
        super().__init__(file, encoding="latin1")  # Python 2 files: str arrays' data as latin-1
        self._path = path

    def find_class(self, module, name):
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"Refusing to read {self._path!r}: it refers to the Python global "
                f"'{module}.{name}', which a weights file (numpy arrays, plain containers, "
                "numbers, strings) never needs; reading it on would run code from the file, so "
                "nothing from it was run. Fix: use the original Detectron / detectron2 model-zoo "
                "file, or a .pth of tensors (torch.save of a state dict)."
            ) from None

    def persistent_load(self, pid):
        raise UnsafePickleError(
            f"Refusing to read {self._path!r}: it holds persistent objects (a torch.save file "
            "renamed to .pkl?), which weights pickles never do. Fix: name it .pth."
        )


def load_weights_pickle(path):
    """The object in the ``.pkl`` weights file ``path``, read without running code from it
    (module docstring); raises :class:`UnsafePickleError` for anything but a weights layout."""
    with open(path, "rb") as f:
        return _WeightsUnpickler(f, path).load()
