#!/usr/bin/env bash
# Download, here (with network), the wheels that promoe needs on an offline GPU machine whose
# python already has torch, triton, transformers, rich, typer, psutil and xxhash, but not
# bitsandbytes (nf4), tomli-w (profile-device --write) or prompt-toolkit (chat), into .whl/
# (git-ignored; carry it to the GPU machine).
# scripts/gpu_check.sh installs whatever is in .whl/ into a side folder before it runs.
#
#   scripts/fetch_gpu_wheels.sh [PYTHON_VERSION]     default 3.12 (the lent machines' python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=${1:-3.12}
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
    --platform manylinux_2_24_x86_64 -d .whl \
    "bitsandbytes==0.50.2" "tomli-w>=1.0" "prompt-toolkit>=3.0" "wcwidth"
ls -la .whl
