"""d2norm: normalization methods for small-batch detection in detectron2.

``import d2norm`` does what any model build needs and nothing else: it registers a stand-in for
``detectron2._C`` where detectron2 cannot be imported without one, and points detectron2's
``get_norm`` call sites at d2norm's names (``NORM: "GN+WS"``, ``"CBN"``, ``"MABN"``, ...).
Every change d2norm makes to detectron2 is listed in :mod:`d2norm.patches`.
"""

from .patches import install_compiled_ops_standin, patch_get_norm

install_compiled_ops_standin()

from .compat import compiled_ops_available  # noqa: E402
from .config import add_d2norm_config  # noqa: E402
from .modeling import build_model, convert_frozen_norms, prepare_model  # noqa: E402
from .norms import D2NORM_NORMS, build_norm  # noqa: E402

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
