#!/usr/bin/env bash
# The test suite: installs (or reuses) the venv, then runs pytest on tests/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore::FutureWarning,ignore::UserWarning}"
exec .venv/bin/python -m pytest tests -q -p no:cacheprovider --durations=10 "$@"
