"""d2norm: normalization methods for small-batch detection in detectron2.

``import d2norm`` registers a stand-in for ``detectron2._C`` if (and only if) detectron2 was
installed without its compiled extension (see :mod:`d2norm.compat`), then patches detectron2's
``get_norm`` so that ``NORM: "GN+WS"``, ``"CBN"``, ``"MABN"``, ... work at every call site.
"""
from .compat import compiled_ops_available, install_compiled_ops_standin

install_compiled_ops_standin()

from .config import add_d2norm_config  # noqa: E402
from .modeling import build_model, convert_frozen_norms, prepare_model  # noqa: E402
from .norms import D2NORM_NORMS, build_norm, patch_get_norm  # noqa: E402

patch_get_norm()

__version__ = "0.1.0"
__all__ = [
    "add_d2norm_config",
    "build_model",
    "prepare_model",
    "convert_frozen_norms",
    "build_norm",
    "patch_get_norm",
    "compiled_ops_available",
    "D2NORM_NORMS",
]
