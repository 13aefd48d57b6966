import os
import re

from setuptools import find_packages, setup


def _version():
    """The version string lives once, in d2norm/__init__.py (``__version__``)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "d2norm", "__init__.py")
    with open(path) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


setup(
    name="d2norm",
    version=_version(),
    description="Normalization methods for small-batch detection in detectron2: "
    "BN*, SyncBN, GN, GN+WS, CBN, MABN, GN-from-scratch",
    packages=find_packages(include=["d2norm", "d2norm.*"]),
    python_requires=">=3.8",
    # Floors are what the code calls, not what was tested (tested: torch 2.14.1, torchvision
    # 0.29.1, Python 3.11; see scripts/install.sh). torch: torch.linalg.vecdot and
    # torch.load(weights_only=...) need 1.13; the tests use `with torch.device("meta")` (2.0), so
    # 2.0 is the lowest version the suite can check. torchvision provides the nms / roi_align ops
    # detectron2 uses without its compiled extension. pycocotools: dataset registration and
    # evaluation. detectron2 is not listed: its distribution name varies (detectron2,
    # pb1-detectron2, ...); scripts/install.sh installs v0.6 (which needs numpy<1.24, Pillow<10).
    install_requires=["torch>=2.0", "torchvision>=0.15", "numpy", "pycocotools>=2.0.2"],
    extras_require={
        # cv2 draws the synthetic dataset (d2norm.data.synthetic_shapes); opencv-python works too
        "data": ["opencv-python-headless"],
        # plots and progress bars of benchmarks/ and tools/small_batch_study.py
        "bench": ["matplotlib", "tqdm"],
        "dev": ["pytest", "ruff==0.17.5"],
    },
)
