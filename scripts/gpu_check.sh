#!/usr/bin/env bash
# Everything that needs a GPU, in one go: the CUDA tests (kernels, NF4, the offloaded model
# with CudaStreamCopy), the kernel benchmark, `promoe profile-device` (its profile saved
# for docs/), and `promoe bench` on the bundled model. Each writes its log under $OUT.
#
#   scripts/gpu_check.sh              on a machine with a CUDA GPU and a CUDA build of torch
#                                     (triton comes with it on Linux)
#   scripts/gpu_check.sh --sweep      the same, and the benchmark also times the GEMV's
#                                     block and split-K alternatives
#   scripts/gpu_check.sh --interpret  no GPU: the Triton kernels run in Triton's interpreter
#                                     on the CPU (index arithmetic and masks only, no speed),
#                                     then every kernel variant is compiled ahead of time
#                                     for sm_75/80/87/90 (registers, spills; a few minutes)
#
# Nothing is downloaded. bitsandbytes (nf4), tomli-w and prompt-toolkit are used when importable, or installed from the
# wheels in .whl/ when that folder exists (scripts/fetch_gpu_wheels.sh; carried to an offline GPU machine, see
# docs/kernels.md); without it the nf4 checks are skipped and say so. Logs and the
# benchmark's JSON go to $OUT when set, else to /tmp/promoe-gpu-check. PYTHON picks the
# interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
LOGS=${OUT:-/tmp/promoe-gpu-check}
MODE=${1:-}
mkdir -p "$LOGS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null; then
    echo "== installing the carried wheels: $(ls .whl)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/promoe-site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/promoe-site"
fi

TESTS=(tests/test_cuda.py tests/test_kernels.py tests/test_nf4.py tests/test_clip_search.py tests/test_quant.py)

if [ "$MODE" = "--interpret" ]; then
    if ! "$PY" -c "import triton" 2>/dev/null; then
        echo "triton is not importable; install it beside the project, e.g." >&2
        echo "  pip install --target /tmp/triton-site triton && PYTHONPATH=/tmp/triton-site $0 --interpret" >&2
        exit 1
    fi
    echo "== Triton interpreter on the CPU"
    status=0
    TRITON_INTERPRET=1 "$PY" -m pytest tests/test_kernels.py -k "interpreted or cpu or bench" -rs \
        -p no:cacheprovider 2>&1 | tee "$LOGS/interpret_tests.log" || status=$?
    echo "== ahead-of-time builds (no GPU needed)"
    aot_status=0
    "$PY" -m quant.kernels.aot_check 2>&1 | tee "$LOGS/aot_check.log" || aot_status=$?
    echo "== interpreter tests exit $status, builds exit $aot_status; logs in $LOGS/"
    [ "$status" -eq 0 ] && [ "$aot_status" -eq 0 ]
    exit
fi

echo "== environment"
"$PY" - <<'EOF'
import sys

import torch

if not torch.cuda.is_available():
    sys.exit(f"no CUDA device visible to torch {torch.__version__} (CUDA build: {torch.version.cuda})")
p = torch.cuda.get_device_properties(0)
print(f"{p.name}: {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, capability {p.major}.{p.minor}")
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda})")
for mod in ("triton", "bitsandbytes", "transformers"):
    try:
        print(f"{mod} {__import__(mod).__version__}")
    except ImportError as exc:
        print(f"{mod}: not importable ({exc})")
EOF
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true

echo "== tests (the cuda-marked ones run here; the rest are CPU tests CI runs too)"
status=0
"$PY" -m pytest "${TESTS[@]}" -rs -p no:cacheprovider 2>&1 | tee "$LOGS/gpu_tests.log" || status=$?

echo "== benchmark"
BENCH_ARGS=(--json "$LOGS/bench.json")
[ "$MODE" = "--sweep" ] && BENCH_ARGS+=(--sweep)
bench_status=0
"$PY" -m quant.kernels.bench "${BENCH_ARGS[@]}" 2>&1 | tee "$LOGS/bench.txt" || bench_status=$?

echo "== promoe profile-device (saved as profile gpu-measured; copied to $LOGS/)"
export PROMOE_HOME=${PROMOE_HOME:-$LOGS/home}
profile_status=0
"$PY" -m promoe_cli.main profile-device --write gpu-measured 2>&1 | tee "$LOGS/profile.txt" || profile_status=$?
cp "$PROMOE_HOME/profiles/gpu-measured.toml" "$LOGS/" 2>/dev/null || true

echo "== promoe bench on the bundled model (half the experts cached, real copies, no emulated link)"
promoe_status=0
"$PY" -m promoe_cli.main bench --cache-fraction 0.5 2>&1 | tee "$LOGS/promoe_bench.txt" || promoe_status=$?

echo "== tests exit $status, kernel benchmark exit $bench_status, profile exit $profile_status, " \
     "promoe bench exit $promoe_status; logs in $LOGS/"
[ "$status" -eq 0 ] && [ "$bench_status" -eq 0 ] && [ "$profile_status" -eq 0 ] && [ "$promoe_status" -eq 0 ]
