#!/usr/bin/env bash
# The test suite: installs (or reuses) the venv, then runs pytest (settings: pyproject.toml).
#   bash scripts/test.sh                 # everything
#   bash scripts/test.sh -m "not slow"   # without the multi-process / end-to-end / install tests
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# pyproject.toml filters these warnings in the test process; this also quiets the child processes
# (distributed and kill-during-save tests).
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore::FutureWarning,ignore::UserWarning}"
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=10 "$@"
