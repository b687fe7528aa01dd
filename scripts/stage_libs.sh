#!/usr/bin/env bash
# Copy the kernel libraries of the active environment's nolabels install into
# python/nolabels/ (git-ignored), so a checkout can be run with
# PYTHONPATH=python on another machine (benchmarks/gpu_check.sh uses them).
set -euo pipefail
cd "$(dirname "$0")/.."
src=$(python - <<'PY'
from nolabels import _lib
import os
print(os.path.dirname(_lib.STATUS.cpu_path or ""))
PY
)
[ -n "$src" ] || { echo "no built library in this environment" >&2; exit 1; }
for f in _C.so _C_cuda.so _build_info.json; do
  if [ -f "$src/$f" ] && [ "$src" != "$PWD/python/nolabels" ]; then cp "$src/$f" python/nolabels/; fi
done
ls -la python/nolabels/*.so
