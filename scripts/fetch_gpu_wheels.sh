#!/usr/bin/env bash
# Download, here (with network), the wheels that promoe needs on an offline GPU machine whose
# python already has torch, triton, transformers, rich, typer, psutil and xxhash, but not
# bitsandbytes (nf4), tomli-w (profile-device --write) or prompt-toolkit (chat), into .whl/
# (git-ignored; carry it to the GPU machine).
# scripts/gpu_check.sh installs whatever is in .whl/ into a side folder before it runs.
#
#   scripts/fetch_gpu_wheels.sh [PYTHON_VERSION [CUDA]]   defaults 3.12 and 13 (the lent
#                                                         machines' python3 and torch's CUDA)
#
# What travels to the GPU machine (the tracked tree, with the bundled model, plus .whl/) must
# stay under 64 MiB. bitsandbytes' wheel (43 MB) carries one library per CUDA and ROCm
# release; every one but the CUDA ${CUDA}.x ones and the CPU one is dropped from it here, which
# leaves a few MB. bitsandbytes loads libbitsandbytes_cuda<torch.version.cuda>.so, so the kept
# ones must match the CUDA build of torch there (torch 2.11+cu130 on the lent H200s).
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=${1:-3.12}
CUDA=${2:-13}
rm -rf .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
    --platform manylinux_2_24_x86_64 -d .whl \
    "bitsandbytes==0.50.2" "tomli-w>=1.0" "prompt-toolkit>=3.0" "wcwidth"

python3 - "$CUDA" .whl/bitsandbytes-*.whl <<'EOF'
"""Rewrite the bitsandbytes wheel without the native libraries the GPU machine cannot load."""
import re
import sys
import zipfile
from pathlib import Path

cuda, path = sys.argv[1], Path(sys.argv[2])
lib = re.compile(r"bitsandbytes/libbitsandbytes_(\w+?)\.(so|dll|dylib)$")


def keep(name: str) -> bool:
    m = lib.search(name)
    return m is None or m.group(1) == "cpu" or m.group(1).startswith(f"cuda{cuda}")


slim = path.with_suffix(".slim")
with zipfile.ZipFile(path) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
    kept = [i for i in src.infolist() if keep(i.filename)]
    if not any(lib.search(i.filename) and "cuda" in i.filename for i in kept):
        sys.exit(f"{path.name} has no CUDA {cuda}.x library; pick another bitsandbytes release")
    for info in kept:
        data = src.read(info)
        if info.filename.endswith(".dist-info/RECORD"):  # drop the removed files' lines
            lines = data.decode().splitlines(keepends=True)
            data = "".join(line for line in lines if keep(line.split(",", 1)[0])).encode()
        dst.writestr(info, data)
slim.replace(path)
print(f"{path.name}: kept {sum(bool(lib.search(i.filename)) for i in kept)} native libraries "
      f"(CUDA {cuda}.x and CPU), {path.stat().st_size / 1e6:.1f} MB")
EOF

ls -la .whl
python3 - <<'EOF'
"""What travels: tracked files, untracked files git does not ignore, and the carried .whl/."""
import subprocess
from pathlib import Path

listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                        capture_output=True, check=True).stdout.split(b"\0")
tree = sum(Path(f.decode()).stat().st_size for f in listed if f and Path(f.decode()).is_file())
wheels = sum(f.stat().st_size for f in Path(".whl").iterdir())
print(f"travels to the GPU machine: {tree / 2**20:.1f} MiB of the work tree + {wheels / 2**20:.1f} MiB "
      f"of wheels = {(tree + wheels) / 2**20:.1f} MiB (the limit is 64 MiB)")
EOF
