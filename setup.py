from setuptools import find_packages, setup

setup(
    name="d2norm",
    version="0.1.0",
    description="Normalization methods for small-batch detection in detectron2: "
    "BN*, SyncBN, GN, GN+WS, CBN, MABN, GN-from-scratch",
    packages=find_packages(include=["d2norm", "d2norm.*"]),
    python_requires=">=3.8",
    # detectron2 is installed by scripts/install.sh (its distribution name varies: detectron2,
    # pb1-detectron2, ...), so it is not listed here.
    install_requires=["torch>=1.10"],
)
