#!/usr/bin/env bash
# Downloads, on a machine with PyPI, what tools/benchmark/gpu_check.sh installs on a GPU machine
# that has no network: the pure-Python wheels of the OpenMMLab stack and of those of their
# dependencies that such a machine lacks, for Python 3.12, and the mmcv 2.1.0 sdist (mmcv has no
# wheel on PyPI; gpu_check.sh builds it there).
#
#   bash tools/benchmark/fetch_gpu_wheels.sh [DEST]        # DEST default: work_dirs/gpu_wheels
#
# The GPU machine is assumed to have Python 3.12 with torch, transformers, numpy, scipy,
# matplotlib, pillow, pyyaml, rich, regex, packaging, einops, safetensors, click, markdown,
# zipp, opencv-python-headless, setuptools, wheel and ninja (NEEDED_ON_DEVICE below); the script
# checks that every requirement of every downloaded wheel is either downloaded or in that list.
# The folder must stay under the device call's carry limit (64 MiB with the working tree), so
# only what is missing is fetched, and the script fails above LIMIT_MIB.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DEST="${1:-$ROOT/work_dirs/gpu_wheels}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
LIMIT_MIB="${LIMIT_MIB:-56}"
MMCV_VERSION=2.1.0

# Pinned to the versions this project's own environment runs with (tools/setup_env.sh).
PURE=(
    mmengine==0.10.7 mmsegmentation==1.2.2 mmpretrain==1.2.0
    addict==2.4.0 yapf==0.43.0 platformdirs==4.14.9 termcolor==3.3.0
    prettytable==3.18.0 wcwidth==0.9.4 ftfy==6.3.1
    mat4py==0.6.0 modelindex==0.0.2 model-index==0.1.11 ordered-set==4.1.0
    importlib-metadata==10.2.0 lazy-importer==0.1.0
    # mmcv's setup.py imports pkg_resources, which setuptools 82 removed.
    setuptools==81.0.0
)
# Requirements the GPU machine satisfies itself (its image's package list).
NEEDED_ON_DEVICE="numpy scipy matplotlib pillow pyyaml rich regex packaging einops safetensors
click markdown zipp torch transformers opencv-python-headless wheel ninja"
# Declared by mmengine and mmcv but provided there by opencv-python-headless (same cv2 module).
PROVIDED_AS="opencv-python=opencv-python-headless"

log() { printf '[fetch_gpu_wheels] %s\n' "$*"; }

[ -x "$PY" ] || { echo "[fetch_gpu_wheels] no python at $PY: run tools/setup_env.sh or set PYTHON" >&2; exit 1; }
mkdir -p "$DEST"
PIP=("$PY" -m pip --disable-pip-version-check -q)
TARGET=(--python-version 3.12 --implementation cp --abi cp312
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

log "pure-Python wheels for Python 3.12 -> $DEST"
for spec in "${PURE[@]}"; do
    # A wheel if there is one, else the sdist (built there with --no-build-isolation).
    if ! "${PIP[@]}" download --no-deps --only-binary=:all: "${TARGET[@]}" -d "$DEST" "$spec" 2>/dev/null; then
        log "no wheel for $spec: taking its sdist"
        "${PIP[@]}" download --no-deps --no-binary :all: --no-build-isolation -d "$DEST" "$spec"
    fi
done

if ! ls "$DEST"/mmcv-$MMCV_VERSION.tar.gz >/dev/null 2>&1; then
    log "mmcv $MMCV_VERSION sdist"
    # Its metadata step imports torch: without build isolation it finds this environment's.
    "${PIP[@]}" download --no-deps --no-binary :all: --no-build-isolation -d "$DEST" "mmcv==$MMCV_VERSION"
fi

log "checking that the set is closed (every requirement downloaded or on the device)"
"$PY" - "$DEST" "$NEEDED_ON_DEVICE" "$PROVIDED_AS" <<'EOF'
import email.parser
import glob
import os
import re
import sys
import tarfile
import zipfile

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

dest, on_device, provided = sys.argv[1], sys.argv[2].split(), sys.argv[3].split()
env = dict(default_environment(), python_version='3.12', python_full_version='3.12.3',
           sys_platform='linux', platform_system='Linux', platform_machine='x86_64',
           implementation_name='cpython', extra='')
aliases = dict(p.split('=') for p in provided)


def metadata_of(path):
    if path.endswith('.whl'):
        with zipfile.ZipFile(path) as z:
            name = next(n for n in z.namelist() if n.endswith('.dist-info/METADATA'))
            return z.read(name).decode()
    with tarfile.open(path) as t:  # sdist: PKG-INFO (requirements may be missing there)
        member = next(m for m in t.getmembers() if m.name.count('/') == 1
                      and m.name.endswith('PKG-INFO'))
        return t.extractfile(member).read().decode()


files = sorted(glob.glob(os.path.join(dest, '*.whl')) + glob.glob(os.path.join(dest, '*.tar.gz')))
brought = {}
for path in files:
    meta = email.parser.Parser().parsestr(metadata_of(path))
    name = canonicalize_name(meta['Name'])
    if name in brought:
        sys.exit(f'two versions of {name} in {dest}: {brought[name][0]} and {path}; keep one')
    brought[name] = (path, meta.get_all('Requires-Dist') or [])
have = set(brought) | {canonicalize_name(n) for n in on_device}
missing = []
for name, (path, requires) in sorted(brought.items()):
    for line in requires:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        needed = canonicalize_name(aliases.get(req.name, req.name))
        if needed not in have:
            missing.append(f'{name} needs {req}')
if missing:
    sys.exit('missing on the device and not downloaded:\n  ' + '\n  '.join(missing))
print(f'  {len(brought)} distributions, every requirement covered')
EOF

size_kib="$(du -sk "$DEST" | cut -f1)"
size_mib=$(( (size_kib + 1023) / 1024 ))
log "$(ls "$DEST" | wc -l) files, $size_mib MiB in $DEST (limit $LIMIT_MIB MiB)"
ls -1 "$DEST" | sed 's/^/  /'
if [ "$size_mib" -gt "$LIMIT_MIB" ]; then
    echo "[fetch_gpu_wheels] $DEST is $size_mib MiB, over the $LIMIT_MIB MiB left for carried files" >&2
    exit 1
fi
