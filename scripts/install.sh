#!/usr/bin/env bash
# Install d2norm and its pinned dependencies into a virtual environment.
#
#   bash scripts/install.sh            # creates ./.venv (a link to a cached venv)
#
# The venv is built once under ${D2NORM_CACHE:-~/.cache/d2norm}/venv-<hash of this file>
# and linked as ./.venv, so a fresh clone on the same machine reuses it. Steps:
#   1. torch 2.14.1 + torchvision 0.29.1 (CUDA build; runs on CPU).
#   2. Pillow<10, setuptools<81, numpy<2 (detectron2 v0.6 uses np.bool / PIL.Image.LINEAR).
#   3. detectron2 from the pb1-detectron2==0.6 sdist (upstream v0.6 Python, no csrc), with its
#      C++ extension build disabled, installed with --no-build-isolation.
#   4. d2norm itself (editable) and pytest.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
PY=${PYTHON:-python3}
stamp=$(cat scripts/install.sh setup.py | sha1sum | cut -c1-12)
cache=${D2NORM_CACHE:-$HOME/.cache/d2norm}
venv="$cache/venv-$stamp"

if [ -f "$venv/.complete" ]; then  # written only after every step succeeded
  echo "[install] reusing $venv"
else
  echo "[install] building $venv"
  t0=$(date +%s)
  rm -rf "$venv"
  mkdir -p "$cache"
  "$PY" -m venv "$venv"
  # (drop pip's notes about local index folders that lack a package; keep everything else)
  pip() { "$venv/bin/python" -m pip "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
  pip install -q --upgrade "pip<26" wheel
  pip install -q torch==2.14.1 torchvision==0.29.1
  # numpy<1.24: detectron2 v0.6 uses np.bool / np.int (removed in numpy 1.24); matplotlib/contourpy
  # versions that still accept numpy 1.23.
  pins=("Pillow<10" "setuptools<81" "numpy<1.24" "matplotlib<3.9" "contourpy<1.3" "opencv-python-headless<4.11")
  pip install -q "${pins[@]}" pytest
  src=$(mktemp -d)
  pip download -q --no-deps --no-build-isolation --no-binary :all: -d "$src" pb1-detectron2==0.6
  tar -xzf "$src"/pb1-detectron2-0.6.tar.gz -C "$src" 2>/dev/null || tar -xzf "$src"/pb1_detectron2-0.6.tar.gz -C "$src"
  d2src=$(find "$src" -maxdepth 1 -mindepth 1 -type d | head -n1)
  sed -i 's/ext_modules=get_extensions(),/ext_modules=[],/' "$d2src/setup.py"
  grep -q 'ext_modules=\[\],' "$d2src/setup.py" || { echo "[install] could not disable the detectron2 extension build" >&2; exit 1; }
  pip install -q --no-build-isolation "$d2src" "${pins[@]}"
  pip check
  rm -rf "$src"
  touch "$venv/.complete"
  echo "[install] built in $(( $(date +%s) - t0 )) s, size $(du -sh "$venv" | cut -f1)"
fi
ln -sfn "$venv" "$here/.venv"
# d2norm itself: editable, so the checkout is what runs (cheap; repeated each time).
"$here/.venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$here"
"$here/.venv/bin/python" -c "import torch, torchvision, detectron2, d2norm; print('[install] torch', torch.__version__, 'detectron2', detectron2.__version__)"
