#!/usr/bin/env bash
# Install d2norm's pinned dependencies and give this checkout a virtual environment in ./.venv.
#
#   bash scripts/install.sh            # then: .venv/bin/python train_net.py ...
#
# Two layers, so that the heavy install is shared but every checkout imports its own d2norm:
#
#   * the dependency venv, built once under ${D2NORM_CACHE:-~/.cache/d2norm}/venv-<hash of this
#     file and setup.py> and shared by every checkout on the machine: torch, detectron2, ...
#     It never contains d2norm.
#   * ./.venv, a thin venv of this checkout (no packages of its own). Two .pth files in its
#     site-packages put, in this order, this checkout (so `import d2norm` is this checkout's
#     d2norm, whatever the working directory) and the dependency venv's site-packages
#     (`site.addsitedir`, so that venv's own .pth files run too) on sys.path.
#
# Re-running is cheap: the dependency venv is reused when complete, ./.venv is rebuilt if it is
# missing, made for another dependency venv, or an older layout (a link to a cached venv).
# Dependency venv steps:
#   1. torch 2.14.1 + torchvision 0.29.1 (CUDA build; runs on CPU).
#   2. Pillow<10, setuptools<81, numpy<1.24 (detectron2 v0.6 uses np.bool / PIL.Image.LINEAR),
#      opencv, matplotlib; pytest and ruff (the linter / formatter .ci/run runs); onnx and
#      onnxruntime (tools/deploy.py --format onnx).
#   3. detectron2 from the pb1-detectron2==0.6 sdist (upstream v0.6 Python, no csrc), with its
#      C++ extension build disabled, installed with --no-build-isolation.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
PY=${PYTHON:-python3}
stamp=$(cat scripts/install.sh setup.py | sha1sum | cut -c1-12)
cache=${D2NORM_CACHE:-$HOME/.cache/d2norm}
venv="$cache/venv-$stamp"
RUFF_VERSION=0.17.5

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
  # onnx / onnxruntime: tools/deploy.py --format onnx (export and the onnxruntime check)
  pip install -q "${pins[@]}" tqdm pytest "ruff==$RUFF_VERSION" "onnx==1.23.2" "onnxruntime==1.32.0"
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

# ./.venv: this checkout's thin venv on top of the dependency venv.
thin="$here/.venv"
if [ -L "$thin" ] || [ ! -f "$thin/pyvenv.cfg" ] || [ "$(cat "$thin/d2norm-deps" 2>/dev/null)" != "$venv" ]; then
  rm -rf "$thin"  # a link (older layout) is removed, not followed
  "$venv/bin/python" -m venv --without-pip "$thin"
fi
thin_site=$("$thin/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
printf '%s\n' "$here" > "$thin_site/d2norm-00-checkout.pth"
"$venv/bin/python" -c 'import sysconfig; print("import site; site.addsitedir(%r)" % sysconfig.get_paths()["purelib"])' \
  > "$thin_site/d2norm-10-deps.pth"
ln -sfn "$venv/bin/ruff" "$thin/bin/ruff"
echo "$venv" > "$thin/d2norm-deps"  # the dependency venv this thin venv was made for
# from / (not the checkout), so that the import proves the .pth files, not the working directory
(cd / && "$thin/bin/python" -c "import torch, torchvision, detectron2, d2norm, os; print('[install] torch', torch.__version__, 'detectron2', detectron2.__version__, 'd2norm', os.path.dirname(d2norm.__file__))")
