#!/usr/bin/env bash
# Creates .venv/ in the repository root and installs eomt_mm with its whole stack.
#
# Re-running is cheap: a stamp (hash of this script and setup.cfg) skips every pip call when
# nothing changed. mmcv 2.1.0 has no wheel on PyPI; it is built from its sdist once (see
# README "Installation" for the three obstacles) and the wheel is cached under $EOMT_MM_CACHE keyed by the
# torch version and the kind of ops (cpu / cuda), because pip's own wheel cache ignores torch.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${EOMT_MM_VENV:-$ROOT/.venv}"
CACHE="${EOMT_MM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/eomt_mm}"
PYTHON="${PYTHON:-python3.11}"
TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1
MMCV_VERSION=2.1.0

log() { printf '[setup] %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
    log "creating virtual environment at $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check -q)

stamp_file="$VENV/.eomt_mm_setup_stamp"
stamp="$(cat "$ROOT/tools/setup_env.sh" "$ROOT/setup.cfg" | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ] \
        && "$PY" -c "import eomt_mm, mmcv.ops" >/dev/null 2>&1; then
    log "environment up to date ($VENV)"
    exit 0
fi

"${PIP[@]}" install wheel ninja
"${PIP[@]}" install "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
# mmcv's setup.py imports pkg_resources, gone from setuptools >= 82; torch needs >= 77.0.3.
"${PIP[@]}" install "setuptools>=77.0.3,<82"
"${PIP[@]}" install "mmengine==0.10.7" "numpy<3" "opencv-python<5"

if "$PY" -c "import mmcv, mmcv.ops; assert mmcv.__version__ == '$MMCV_VERSION'" >/dev/null 2>&1; then
    log "mmcv $MMCV_VERSION with compiled ops already installed"
else
    if command -v nvcc >/dev/null 2>&1 && "$PY" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        ops=cuda; export FORCE_CUDA=1
    else
        ops=cpu; export FORCE_CUDA=0
    fi
    wheel_dir="$CACHE/mmcv-$MMCV_VERSION-torch$TORCH_VERSION-$ops"
    wheel="$(ls "$wheel_dir"/mmcv-*.whl 2>/dev/null | head -n1 || true)"
    if [ -z "$wheel" ]; then
        log "building mmcv $MMCV_VERSION ($ops ops) from source: about 7 minutes on 2 cores"
        build="$(mktemp -d)"
        trap 'rm -rf "$build"' EXIT
        "${PIP[@]}" download --no-deps --no-build-isolation --no-binary :all: -d "$build" "mmcv==$MMCV_VERSION"
        tar -xzf "$build"/mmcv-$MMCV_VERSION.tar.gz -C "$build"
        # torch >= 2.14 headers require C++20; mmcv hard-codes C++17.
        sed -i 's/-std=c++17/-std=c++20/g' "$build/mmcv-$MMCV_VERSION/setup.py"
        grep -q -- '-std=c++20' "$build/mmcv-$MMCV_VERSION/setup.py" \
            || { echo "[setup] could not patch mmcv's C++ standard" >&2; exit 1; }
        # Without --no-build-isolation the build sees no torch and silently omits mmcv._ext.
        MAX_JOBS="${MAX_JOBS:-$(nproc)}" MMCV_WITH_OPS=1 "${PIP[@]}" wheel --no-deps \
            --no-build-isolation --no-cache-dir -w "$build/dist" "$build/mmcv-$MMCV_VERSION"
        mkdir -p "$wheel_dir"
        # Copy then rename so an interrupted copy never leaves a half wheel in the cache.
        built="$(ls "$build"/dist/mmcv-*.whl)"
        cp "$built" "$wheel_dir/.partial" && mv "$wheel_dir/.partial" "$wheel_dir/$(basename "$built")"
        wheel="$wheel_dir/$(basename "$built")"
    else
        log "using cached mmcv wheel $wheel"
    fi
    "${PIP[@]}" install --no-deps --force-reinstall "$wheel"
    "${PIP[@]}" install addict mmengine packaging pillow pyyaml yapf "opencv-python<5"
    "$PY" -c "import mmcv.ops; from mmcv.ops import point_sample" \
        || { echo "[setup] mmcv was installed without its compiled ops" >&2; exit 1; }
fi

"${PIP[@]}" install -e "$ROOT[tests,export]" --no-build-isolation
echo "$stamp" > "$stamp_file"
log "done: activate with 'source $VENV/bin/activate'"
