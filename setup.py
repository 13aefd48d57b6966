import os
import re
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
# Project home page; the one place it is written (the README links to it too).
URL = "https://github.com/d2norm/d2norm"


def _version():
    """The version string lives once, in d2norm/__init__.py (``__version__``)."""
    with open(os.path.join(HERE, "d2norm", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def _readme():
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        return f.read()


class BuildPyWithRecipes(build_py):
    """``build_py`` that also copies the top-level ``configs/`` (the recipes' source of truth)
    into the built package as ``d2norm/model_zoo/configs``, so a wheel or ``pip install .``
    ships every recipe (YAML and lazy ``.py``) with its relative ``_BASE_`` layout intact. In a
    checkout, :mod:`d2norm.model_zoo` reads ``configs/`` directly."""

    def run(self):
        super().run()
        src = os.path.join(HERE, "configs")
        dst = os.path.join(self.build_lib, "d2norm", "model_zoo", "configs")
        if os.path.isdir(dst):
            shutil.rmtree(dst)
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(
    name="d2norm",
    version=_version(),
    description="Normalization methods for small-batch detection in detectron2: BN*, FrozenStatsBN, "
    "SyncBN, GN, GN+WS, BN+WS, BCN, BCN+WS, CBN, MABN, BRN, FRN+TLU, EvoNorm-S0",
    long_description=_readme(),
    long_description_content_type="text/markdown",
    url=URL,
    project_urls={"Source": URL, "Issues": URL + "/issues"},
    license="Apache-2.0",
    license_files=["LICENSE"],
    keywords="detectron2 normalization group-norm weight-standardization cross-iteration-batch-norm "
    "batch-channel-norm moving-average-batch-norm batch-renorm filter-response-norm evonorm detection",
    classifiers=[
        "Programming Language :: Python :: 3",
        "Operating System :: OS Independent",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    packages=find_packages(include=["d2norm", "d2norm.*"]),
    cmdclass={"build_py": BuildPyWithRecipes},
    entry_points={
        "console_scripts": [
            # train_net.py as a command: YAML recipes (also from the package: d2norm.model_zoo)
            "d2norm-train = d2norm.engine.launch:cli",
        ]
    },
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
        # tools/deploy.py --format onnx: export and the onnxruntime check
        "onnx": ["onnx>=1.14", "onnxruntime>=1.15"],
        "dev": ["pytest", "ruff==0.17.5"],
    },
)
