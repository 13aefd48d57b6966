#!/usr/bin/env bash
# Every benchmark on one GPU in one go (< 8 minutes on an H100 / H200), written to
# docs/benchmarks_gpu.md (and docs/benchmarks_gpu.png):
#
#   bash benchmarks/gpu.sh                     # CUDA: kernel counts and the conv side timed,
#                                              # layers, model at 256x320 and at 800x1216
#                                              # (recipes' RoIs), MABN / CBN against their
#                                              # official formulations
#   bash benchmarks/gpu.sh --device cpu        # the same steps on the CPU with the smallest
#                                              # settings (a check of the script, ~5 min on 2
#                                              # cores); writes $TMPDIR/benchmarks_gpu_cpu.md
#   bash benchmarks/gpu.sh --output FILE.md    # write elsewhere
#
# Each step has its own time limit and the run stops starting new steps once the budget
# (BUDGET_S, default 450 s) is spent; a step that fails or runs out of time is reported in the
# file, the others are kept. Run from the checkout root with its .venv (scripts/install.sh).
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
PY=${PY:-.venv/bin/python}
device=cuda
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device="$2"; shift 2 ;;
    --output) out="$2"; shift 2 ;;
    *) echo "usage: bash benchmarks/gpu.sh [--device cuda|cpu] [--output FILE.md]" >&2; exit 2 ;;
  esac
done
if [ "$device" = cuda ]; then
  out=${out:-docs/benchmarks_gpu.md}
  quick=()
  model_small=(--device cuda)
  model_coco=(--device cuda --size 800 1216 --recipe-rois --norms "BN*" BN GN GN+WS CBN "CBN floor" MABN)
  kern=(--device cuda)
else
  out=${out:-${TMPDIR:-/tmp}/benchmarks_gpu_cpu.md}
  quick=(--quick)
  model_small=(--device cpu --quick --reps 1 --warmup 1 --norms BN GN GN+WS CBN "CBN floor" MABN)
  model_coco=()  # no COCO-size run on the CPU
  kern=(--device cpu --no-time)
fi
budget=${BUDGET_S:-450}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
t0=$(date +%s)
status=()

step() {  # step NAME LIMIT_S COMMAND...: run unless the budget is spent; record the outcome
  local name=$1 limit=$2; shift 2
  local used=$(( $(date +%s) - t0 ))
  if [ $(( used + 10 )) -ge "$budget" ]; then
    status+=("$name: skipped (budget of ${budget} s spent)"); echo "[gpu.sh] skip $name"; return
  fi
  [ $(( budget - used )) -lt "$limit" ] && limit=$(( budget - used ))
  echo "[gpu.sh] $name (limit ${limit} s)"
  local s=$(date +%s)
  timeout "$limit" "$@" > "$work/$name.log" 2>&1
  local rc=$?
  tail -n 3 "$work/$name.log"
  if [ $rc -eq 0 ]; then
    status+=("$name: done in $(( $(date +%s) - s )) s")
  else
    status+=("$name: failed (exit $rc after $(( $(date +%s) - s )) s; see the log lines below)")
    { echo "--- $name"; tail -n 20 "$work/$name.log"; } >> "$work/failures.txt"
  fi
}

step kernels 120 "$PY" benchmarks/kernels.py "${kern[@]}" --output "$work/kernels.md"
step layers 150 "$PY" benchmarks/layers.py --device "$device" "${quick[@]}" --output "$work/layers.md" --plot "$work/layers.png"
step model 150 "$PY" benchmarks/model.py "${model_small[@]}" --output "$work/model.md" --plot "$work/model.png"
if [ ${#model_coco[@]} -gt 0 ]; then
  step model_coco 150 "$PY" benchmarks/model.py "${model_coco[@]}" --output "$work/model_coco.md" --plot "$work/model_coco.png"
fi
step mabn_speed 60 "$PY" benchmarks/mabn_speed.py --device "$device" "${quick[@]}"
step cbn_speed 60 "$PY" benchmarks/cbn_speed.py --device "$device" "${quick[@]}"

total=$(( $(date +%s) - t0 ))
printf '%s\n' "${status[@]}" > "$work/status.txt"
"$PY" - "$work" "$out" "$device" "$total" <<'EOF'
"""Assemble the report from the steps' Markdown sections and logs."""
import os
import re
import sys

import torch

work, out, device, total = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])


def section(md, name, rename=None):
    path = os.path.join(work, md)
    if not os.path.exists(path):
        return None
    m = re.search(rf"<!-- BEGIN {name} -->.*?<!-- END {name} -->", open(path, encoding="utf-8").read(), re.S)
    if not m:
        return None
    text = m.group(0)
    if rename:
        text = text.replace(f"BEGIN {name} -->", f"BEGIN {rename} -->").replace(f"END {name} -->", f"END {rename} -->")
        text = text.replace(f"<!-- DATA {name} ", f"<!-- DATA {rename} ").replace("## Model", "## Model at 800×1216", 1)
    return text


def log(name):
    path = os.path.join(work, name + ".log")
    lines = [l for l in open(path, encoding="utf-8").read().splitlines() if "Warning" not in l and "warn(" not in l] if os.path.exists(path) else []
    return "\n".join(lines[-40:])


gpu = torch.cuda.get_device_name(0) if device == "cuda" and torch.cuda.is_available() else "CPU (a check of the script, smallest settings)"
parts = [
    f"# Benchmarks on a GPU ({gpu})",
    "",
    f"Written by `bash benchmarks/gpu.sh{'' if device == 'cuda' else ' --device ' + device}` in {total / 60:.1f} min: the "
    "scripts of [benchmarks.md](benchmarks.md) with `--device " + device + "` (torch "
    f"{torch.__version__}). Kernel counts do not depend on the device except where a backend "
    "picks another fused kernel (cuDNN batch norm); a small training step on a GPU is launch-bound, "
    "so they predict the time ratios there.",
    "",
    "Steps:",
    "",
    *[f"- {l}" for l in open(os.path.join(work, "status.txt"), encoding="utf-8").read().splitlines()],
    "",
]
for md, name, rename in [
    ("kernels.md", "kernels", None),
    ("layers.md", "layers", None),
    ("model.md", "model", None),
    ("model_coco.md", "model", "model_coco"),
]:
    s = section(md, name, rename)
    if s:
        parts += [s, ""]
for name, title in [("mabn_speed", "MABN against its official formulation"), ("cbn_speed", "CBN in detail")]:
    text = log(name)
    if text:
        parts += [f"## {title} (`benchmarks/{name}.py`)", "", "```", text, "```", ""]
fail = os.path.join(work, "failures.txt")
if os.path.exists(fail):
    parts += ["## Failed steps", "", "```", open(fail, encoding="utf-8").read().rstrip(), "```", ""]
os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
with open(out, "w", encoding="utf-8") as f:
    f.write("\n".join(parts).rstrip() + "\n")
print(f"[gpu.sh] wrote {out}")
EOF
png="${out%.md}.png"
[ -f "$work/layers.png" ] && cp "$work/layers.png" "$png"
echo "[gpu.sh] total ${total} s"
