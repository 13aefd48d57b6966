#!/usr/bin/env bash
# Run d2norm's test suite against a detectron2 source tree, e.g. a clone of detectron2 main:
#
#     scripts/test-detectron2-source.sh DIR [pytest arguments...]
#
# DIR is the root of the tree (it holds detectron2/__init__.py). How: the tree's pure-Python
# `detectron2` package is put first on PYTHONPATH, in front of the detectron2 installed in the
# venv, so the venv and its packages are used as they are and nothing is installed or changed
# anywhere. This works because detectron2 after January 2022 imports without its compiled
# extension (`detectron2._C`) and the models d2norm trains need none of its ops; d2norm then
# installs no `_C` stand-in (d2norm/patches.py). A tree that needs `_C` to import (v0.6) gets the
# stand-in, as the installed v0.6 does. Python does not write bytecode into DIR.
#
# Environment: PYTHON (default: the checkout's .venv/bin/python), OMP_NUM_THREADS (default 1).
# Without pytest arguments the whole suite runs (tests/ -q). The script first prints which
# detectron2 is imported and its git commit, if DIR is a git checkout.
set -euo pipefail

if [ $# -lt 1 ] || [ ! -f "$1/detectron2/__init__.py" ]; then
    echo "usage: $0 DIR [pytest args...]  (DIR: a detectron2 source tree, with DIR/detectron2/__init__.py)" >&2
    exit 2
fi
SRC="$(cd "$1" && pwd)"
shift
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$REPO/.venv/bin/python}"
if [ ! -x "$PY" ]; then
    echo "$PY not found: run scripts/install.sh first, or set PYTHON to a Python with torch and detectron2's dependencies" >&2
    exit 2
fi

export PYTHONPATH="$SRC:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

cd "$REPO"
"$PY" - "$SRC" <<'EOF'
import os
import sys

import detectron2

src = os.path.realpath(sys.argv[1])
where = os.path.realpath(os.path.dirname(detectron2.__file__))
if not where.startswith(src + os.sep):
    sys.exit(f"detectron2 was imported from {where}, not from {src}")
import d2norm
from d2norm import patches

print(f"detectron2 {detectron2.__version__} from {where}; "
      f"_C stand-in installed: {patches.PATCHES[0].is_applied()}")
EOF
if git -C "$SRC" rev-parse HEAD >/dev/null 2>&1; then
    echo "detectron2 commit: $(git -C "$SRC" log -1 --format='%H %cd' --date=short)"
fi
if [ $# -eq 0 ]; then
    set -- tests -q
fi
exec "$PY" -m pytest -p no:cacheprovider "$@"
