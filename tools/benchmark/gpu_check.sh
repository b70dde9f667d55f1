#!/usr/bin/env bash
# The GPU check in one call on a machine with a GPU, Python 3.12, torch and transformers but no
# network and none of the OpenMMLab packages (they come as files in $WHEELS, made beforehand on a
# machine with PyPI by tools/benchmark/fetch_gpu_wheels.sh):
#   1. a virtual environment with --system-site-packages (the machine's torch and transformers),
#   2. the carried wheels installed offline (pip --no-index --no-deps),
#   3. mmcv 2.1.0 built from its sdist with CPU ops (EoMT's GPU path uses no compiled mmcv op;
#      the GPU is hidden from the build so that mmcv's setup.py does not compile its CUDA ops),
#      -std=c++17 raised to c++20 only when the installed torch's headers demand it,
#   4. this repository installed editable without dependencies,
#   5. tools/benchmark/gpu_check.py with what is left of the total time budget.
#
#   bash tools/benchmark/gpu_check.sh [gpu_check.py arguments]
#
# Environment: WHEELS (default work_dirs/gpu_wheels), OUT_DIR (default $OUT when set, else
# work_dirs/gpu_check), TOTAL_BUDGET (seconds for everything, set-up included, default 570: the
# device call's limit is 600), CHECK_BUDGET (at most this for gpu_check.py, default 450), VENV (default
# /tmp/eomt_mm_gpu_venv), PYTHON (the interpreter that has torch; default python3).
# GPU_CHECK_DRY_RUN=1 rehearses the script on a machine without a GPU: PYTHON defaults to this
# repository's .venv, whose mmcv is used instead of building one (BUILD_MMCV=1 builds it anyway:
# minutes on 2 cores), and gpu_check.py runs with --dry-run.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
START=$(date +%s)
DRY="${GPU_CHECK_DRY_RUN:-0}"
if [ "$DRY" = 1 ]; then PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"; else PYTHON="${PYTHON:-python3}"; fi
VENV="${VENV:-/tmp/eomt_mm_gpu_venv}"
WHEELS="${WHEELS:-$ROOT/work_dirs/gpu_wheels}"
OUT_DIR="${OUT_DIR:-${OUT:-$ROOT/work_dirs/gpu_check}}"
TOTAL_BUDGET="${TOTAL_BUDGET:-570}"
CHECK_BUDGET="${CHECK_BUDGET:-450}"
MMCV_VERSION=2.1.0
BUILD_MMCV="${BUILD_MMCV:-$([ "$DRY" = 1 ] && echo 0 || echo 1)}"
export PYTHONUNBUFFERED=1

mkdir -p "$OUT_DIR"
exec > >(tee -a "$OUT_DIR/gpu_check.log") 2>&1
log() { printf '[gpu_check.sh +%ss] %s\n' "$(( $(date +%s) - START ))" "$*"; }
die() { log "error: $*"; exit 3; }

[ -d "$WHEELS" ] || die "no wheel folder $WHEELS: run tools/benchmark/fetch_gpu_wheels.sh on a machine with PyPI and carry the folder"
ls "$WHEELS"/mmcv-$MMCV_VERSION.tar.gz >/dev/null 2>&1 || die "$WHEELS lacks mmcv-$MMCV_VERSION.tar.gz"
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

# 1. The environment. Its bin/ has no ninja: the base interpreter's bin/ goes on PATH.
BASE_BIN="$("$PYTHON" -c 'import os, sys; print(os.path.join(sys.prefix, "bin"))')"
export PATH="$PATH:$BASE_BIN"
if [ -e "$VENV" ]; then
    [ -f "$VENV/pyvenv.cfg" ] || die "$VENV exists and is not a virtual environment; set VENV"
    rm -rf "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip)
if ! "$PYTHON" -m venv --system-site-packages "$VENV" 2>"$OUT_DIR/venv.err"; then
    # An interpreter without ensurepip: a venv without pip, filled by the base pip (--python).
    log "venv with pip failed ($(tail -n1 "$OUT_DIR/venv.err")); creating it without pip"
    rm -rf "$VENV"
    "$PYTHON" -m venv --system-site-packages --without-pip "$VENV"
    PIP=("$PYTHON" -m pip --python "$PY")
fi
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# When PYTHON is itself a venv (the GPU machine's python3 is), --system-site-packages reaches
# the interpreter below it, not PYTHON's packages: a .pth file adds those, after the venv's own
# folder, so the wheels installed below take precedence over anything there.
"$PYTHON" -c 'import sys, sysconfig
p = sysconfig.get_paths()
if sys.prefix != sys.base_prefix:
    print("\n".join(dict.fromkeys([p["purelib"], p["platlib"]])))' > "$SITE/_gpu_check_base.pth"
PIP+=(--disable-pip-version-check --no-input -q)
log "venv $VENV ($("$PY" --version 2>&1), torch $("$PY" -c 'import torch; print(torch.__version__)'))"

# 2. The carried wheels (and any carried sdist other than mmcv's), offline, exactly these files.
"${PIP[@]}" install --no-index --no-deps --no-cache-dir "$WHEELS"/*.whl
for sdist in "$WHEELS"/*.tar.gz; do
    case "$(basename "$sdist")" in mmcv-*) continue ;; esac
    "${PIP[@]}" install --no-index --no-deps --no-build-isolation --no-cache-dir "$sdist"
done
log "installed $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS"

# 3. mmcv with CPU ops.
ATEN_H="$("$PY" -c 'import os, torch.utils.cpp_extension as c; print(os.path.join(c.include_paths()[0], "ATen", "ATen.h"))')"
if grep -q 'C++20 or later' "$ATEN_H"; then CXX_STD=c++20; else CXX_STD=c++17; fi
log "torch's headers ($ATEN_H) need $CXX_STD"
if [ "$BUILD_MMCV" = 1 ]; then
    build="$(mktemp -d)"
    trap 'rm -rf "$build"' EXIT
    tar -xzf "$WHEELS/mmcv-$MMCV_VERSION.tar.gz" -C "$build"
    src="$build/mmcv-$MMCV_VERSION"
    if [ "$CXX_STD" = c++20 ]; then
        sed -i 's/-std=c++17/-std=c++20/g' "$src/setup.py"
        grep -q -- '-std=c++20' "$src/setup.py" || die "could not raise mmcv's C++ standard"
    fi
    command -v ninja >/dev/null 2>&1 && log "building mmcv $MMCV_VERSION (CPU ops, ninja, $(nproc) jobs)" \
        || log "building mmcv $MMCV_VERSION (CPU ops, no ninja: one file at a time)"
    # mmcv's setup.py compiles CUDA ops whenever torch sees a GPU, whatever FORCE_CUDA says.
    CUDA_VISIBLE_DEVICES="" FORCE_CUDA=0 MMCV_WITH_OPS=1 MAX_JOBS="$(nproc)" \
        "${PIP[@]}" install --no-index --no-deps --no-build-isolation --no-cache-dir "$src"
    log "mmcv built"
else
    log "mmcv: not built (dry run), using $("$PY" -c 'import mmcv, os; print(os.path.dirname(mmcv.__file__))')"
fi

# 4. This repository, editable, without dependencies.
"${PIP[@]}" install --no-index --no-deps --no-build-isolation -e "$ROOT"
"$PY" -c "import mmcv, mmcv.ops, mmseg.models, mmpretrain.models, eomt_mm, transformers, torch
from mmcv.ops import point_sample
print('imports ok: mmcv', mmcv.__version__, 'torch', torch.__version__, 'transformers',
      transformers.__version__, 'cuda', torch.cuda.is_available())" || die "the stack does not import"

# 5. The check, with the budget that is left (10 s kept for the reports; a hard stop after it).
left=$(( TOTAL_BUDGET - ($(date +%s) - START) - 10 ))
[ "$left" -le "$CHECK_BUDGET" ] || left="$CHECK_BUDGET"
[ "$left" -ge 60 ] || die "only ${left}s of the ${TOTAL_BUDGET}s budget left after the set-up"
flags=()
[ "$DRY" = 1 ] && flags+=(--dry-run)
log "gpu_check.py with a budget of ${left}s"
set +e
timeout --kill-after=5 $(( left + 8 )) "$PY" tools/benchmark/gpu_check.py "${flags[@]}" \
    --out "$OUT_DIR" --budget "$left" "$@"
status=$?
set -e
log "gpu_check.py exit status $status; reports in $OUT_DIR"
exit "$status"
