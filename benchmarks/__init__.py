"""Benchmark scripts (see README.md here). Run from a checkout whose .venv was made by
scripts/install.sh (it puts the checkout on the import path): ``.venv/bin/python benchmarks/layers.py``
or ``.venv/bin/python -m benchmarks.layers``. Shared helpers: :mod:`benchmarks.common`."""
