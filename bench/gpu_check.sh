#!/usr/bin/env bash
# The GPU check in one script, under ten minutes on one GPU: the CUDA tests against the CPU, then the figures
# (sampling images/s, icon-steps/s in float32 and bfloat16, a small build) in one JSON file.
#
#   bash bench/gpu_check.sh [DEVICE] [OUT]      DEVICE: cuda (default) or cpu (a dry run); OUT: a folder for the JSON
#
# On a machine that has its own torch (a GPU image), atlas goes in without touching it: `pip install --no-deps -e .`
# and only the packages atlas needs that are missing. ATLAS_SHARED names the folder holding models/ and data/ (the
# shared weights and photos), default ../shared.
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=${1:-cuda}
OUT=${2:-outputs/gpu_check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"

if ! "$PY" -c "import atlas.models" 2>/dev/null; then
  "$PY" -m pip install -q --no-deps -e . || exit 2
  missing=$("$PY" - <<'PYEOF'
import importlib.metadata as md, re, tomllib
from packaging.requirements import Requirement
need = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
out = []
for spec in need:
    r = Requirement(spec)
    if r.name in ("torch", "torchvision"):
        continue  # the machine's own
    try:
        md.version(r.name)
    except md.PackageNotFoundError:
        out.append(spec)
print(" ".join(f"'{s}'" for s in out))
PYEOF
)
  [ -n "$missing" ] && eval "$PY -m pip install -q $missing"
fi
"$PY" -c "import torch; print('gpu_check: torch', torch.__version__, 'cuda', torch.cuda.is_available())"

status=0
if [ "$DEVICE" != cpu ]; then
  timeout 300 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -15 | tee "$OUT/test_cuda.txt" || status=1
fi
timeout 420 "$PY" bench/gpu_check.py --device "$DEVICE" --out "$OUT/gpu_check.json" $([ "$DEVICE" = cpu ] && echo --tiny) || status=1
exit $status
