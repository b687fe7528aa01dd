#!/usr/bin/env bash
# Rebuild the kernel libraries into the active environment (editable install).
# Serialised with a lock so parallel workers don't share a half-written build dir.
set -euo pipefail
cd "$(dirname "$0")/.."
exec flock /tmp/nolabels_build.lock \
  python -m pip install --no-build-isolation --no-deps -e . -q "$@"
