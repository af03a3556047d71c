#!/usr/bin/env bash
# Everything that needs a GPU, in one go and within a time budget, most important first:
#   1. environment (GPU, driver, torch, triton, bitsandbytes)
#   2. promoe profile-device --write gpu-measured       (the profile docs/ needs: issue 6)
#   3. the kernel and nf4 tests against the references   (issue 8)
#   4. the kernel benchmark: GB/s of packed weights against the device's bandwidth, and one
#      decode layer fused vs dequantize-then-matmul     (issue 8)
#   5. the CUDA end-to-end tests: the offloaded model on the GPU with CudaStreamCopy equals
#      transformers, slots never race compute, formats on CUDA agree with the CPU
#   6. promoe bench on the bundled model, with the kernels and without (PROMOE_KERNELS=0)
#   7. promoe bench on a random model with Mixtral-8x7B's expert shapes (4096x14336, 8 experts,
#      top-2; 4 layers), built there: real copies of 88 MB int4 experts, kernels on and off,
#      then LFU against host-misses (misses computed by the CPU when that beats the copy),
#      then both under a budget with fewer slots than layers (half the layers streaming)
#
#   scripts/gpu_check.sh              on a machine with a CUDA GPU and a CUDA build of torch
#   scripts/gpu_check.sh --sweep      the same; the kernel benchmark also times the GEMV's
#                                     block and split-K alternatives
#   scripts/gpu_check.sh --rehearse   no GPU needed: the same steps on the CPU, at toy sizes,
#                                     with the CUDA-only ones skipped (checks this script)
#   scripts/gpu_check.sh --interpret  no GPU: the Triton kernels run in Triton's interpreter
#                                     on the CPU (index arithmetic and masks only, no speed),
#                                     then every kernel variant is compiled ahead of time
#                                     for sm_75/80/87/90 (registers, spills; a few minutes)
#
# BUDGET (seconds, default 450) bounds the whole run: each step runs under `timeout` with at
# most its own cap and what is left of the budget, a step that runs out is interrupted (pytest
# still prints what passed), and steps with no time left are skipped; summary.txt says which.
# On the lent machines (15 minutes of device time a session, a few of them to start one) run
#   device run: scripts/gpu_check.sh   carry [".whl"]   timeout_s = BUDGET + 90
#
# Nothing is downloaded. bitsandbytes (nf4), tomli-w and prompt-toolkit are used when
# importable, or installed from the wheels in .whl/ when that folder exists
# (scripts/fetch_gpu_wheels.sh, which keeps the tree that travels under 64 MiB); without
# them the nf4 checks are skipped and say so. What comes back is at most 8 files in $OUT (or
# /tmp/promoe-gpu-check): summary.txt, env.txt, tests.log, kernel_bench.txt,
# kernel_bench.json, profile.txt (with the saved profile appended), promoe_bench.txt,
# mixtral_shapes.txt. promoe's own directory (stores, models) stays in /tmp.
# PYTHON picks the interpreter (default: the project's .venv/bin/python where there is one,
# as `make` creates it, else python3). PROMOE_GPU_HOME is promoe's folder for the run
# (default /tmp/promoe-gpu-home): never the user's PROMOE_HOME.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; fi
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch, typer, transformers" 2>/dev/null; then
    echo "$PY cannot import torch, typer and transformers: run make setup first, or set PYTHON" >&2
    exit 2
fi
LOGS=${OUT:-/tmp/promoe-gpu-check}
MODE=${1:-}
BUDGET=${BUDGET:-450}
mkdir -p "$LOGS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export PROMOE_HOME=${PROMOE_GPU_HOME:-/tmp/promoe-gpu-home}
# no network there: nothing may wait on a hub (pytest steps and bitsandbytes' import included)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
SUMMARY=$LOGS/summary.txt
START=$SECONDS

if compgen -G ".whl/*.whl" >/dev/null; then
    echo "== installing the carried wheels: $(ls .whl | tr '\n' ' ')"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/promoe-site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/promoe-site"
fi

if [ "$MODE" = "--interpret" ]; then
    if ! "$PY" -c "import triton" 2>/dev/null; then
        echo "triton is not importable; install it beside the project, e.g." >&2
        echo "  pip install --target /tmp/triton-site triton==3.6.0 'numpy<2.4' && PYTHONPATH=/tmp/triton-site $0 --interpret" >&2
        echo "(Triton 3.6's interpreter fails on numpy 2.4 and newer: triton-lang/triton#9171)" >&2
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

CUDA=1
if [ "$MODE" = "--rehearse" ]; then
    CUDA=0
elif [ -n "$MODE" ] && [ "$MODE" != "--sweep" ]; then
    echo "unknown option $MODE; see the top of $0" >&2
    exit 2
fi

# step NAME CAP LOG COMMAND...: run COMMAND with its output appended to LOG (and shown), for at
# most CAP seconds and what is left of the budget; one line of SUMMARY says how it ended.
failed=0
last_rc=0
step() {
    local name=$1 cap=$2 log=$3
    shift 3
    local left=$((BUDGET - (SECONDS - START)))
    if [ "$left" -lt 15 ]; then
        printf '%-34s skipped: the budget (%ss) is spent\n' "$name" "$BUDGET" | tee -a "$SUMMARY"
        failed=1
        return
    fi
    local limit=$((cap < left ? cap : left)) t0=$SECONDS rc
    # timeout runs programs, not shell functions: a function (exported) runs in a child bash
    declare -F "$1" >/dev/null && set -- bash -c '"$@"' _ "$@"
    echo "== $name (at most ${limit}s)" | tee -a "$log"
    timeout --signal=INT --kill-after=20 "$limit" "$@" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    last_rc=$rc
    local how="ok"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        how="stopped at its ${limit}s limit"
    elif [ "$rc" -ne 0 ]; then
        how="exit $rc"
    fi
    [ "$rc" -ne 0 ] && failed=1
    printf '%-34s %-28s %4ss\n' "$name" "$how" "$((SECONDS - t0))" | tee -a "$SUMMARY"
}

skip() {  # skip NAME WHY
    printf '%-34s skipped: %s\n' "$1" "$2" | tee -a "$SUMMARY"
}

: >"$SUMMARY"
echo "gpu_check ${MODE:-(GPU)} on $(hostname), $(date -u +%FT%TZ), budget ${BUDGET}s" | tee -a "$SUMMARY"

export CUDA PY
env_check() {
    "$PY" - <<'EOF'
import os
import sys

import torch

if os.environ["CUDA"] == "1":
    if not torch.cuda.is_available():
        sys.exit(f"no CUDA device visible to torch {torch.__version__} (CUDA build: {torch.version.cuda})")
    p = torch.cuda.get_device_properties(0)
    print(f"{p.name}: {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, capability {p.major}.{p.minor}")
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), {os.cpu_count()} CPUs")
for mod in ("triton", "bitsandbytes", "transformers", "accelerate", "typer", "rich", "prompt_toolkit",
            "safetensors", "xxhash", "psutil", "tomli_w", "pytest", "pytest_timeout"):
    try:
        m = __import__(mod)
        try:
            from importlib.metadata import version

            v = version(mod.replace("_", "-"))
        except Exception:  # not installed as a distribution of that name
            v = getattr(m, "__version__", "(no version)")
        print(f"{mod} {v}")
    except Exception as exc:  # a broken install says why instead of stopping the check
        print(f"{mod}: not importable ({type(exc).__name__}: {exc})")
# Triton builds a small C launcher at its first kernel launch: it needs a C compiler and
# Python.h, without which every kernel path raises (the reference path still runs)
import shutil
import sysconfig
from pathlib import Path

cc = next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
header = Path(sysconfig.get_paths()["include"]) / "Python.h"
print(f"C compiler: {shutil.which(cc) if cc else 'none'}; {header}: {'present' if header.is_file() else 'MISSING'}")
EOF
    [ "$CUDA" = 0 ] || nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
}
export -f env_check
step "environment" 60 "$LOGS/env.txt" env_check
if [ "$last_rc" -ne 0 ]; then
    echo "the environment check failed (env.txt); nothing else to check" | tee -a "$SUMMARY"
    exit 1
fi

PROMOE=("$PY" -m promoe_cli.main)
PROFILE_ARGS=(--write gpu-measured)
[ "$CUDA" = 0 ] && PROFILE_ARGS+=(--quick)
step "profile-device --write" 120 "$LOGS/profile.txt" "${PROMOE[@]}" profile-device "${PROFILE_ARGS[@]}"
if [ -f "$PROMOE_HOME/profiles/gpu-measured.toml" ]; then
    { echo "== the saved profile ($PROMOE_HOME/profiles/gpu-measured.toml)"
      cat "$PROMOE_HOME/profiles/gpu-measured.toml"; } >>"$LOGS/profile.txt"
fi

# timeout_method=signal: pyproject's "thread" os._exit()s the whole run at the first timeout
PYTEST=("$PY" -m pytest -rs -p no:cacheprovider -o addopts= -o timeout_method=signal)
# a hung test fails alone, with the stacks, where pytest-timeout is there (the image has it)
"$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST+=(--timeout 120)
# Triton compiles every kernel variant at its first launch (a few hundred here, on a cold
# cache): with pytest-xdist (the image has it) eight processes compile them at once, and the
# on-disk cache they fill serves the benchmark and the end-to-end tests after
KPAR=()
[ "$CUDA" = 1 ] && "$PY" -c "import xdist" 2>/dev/null && KPAR=(-n 8)
step "kernel and nf4 tests" 200 "$LOGS/tests.log" "${PYTEST[@]}" "${KPAR[@]}" tests/test_kernels.py tests/test_nf4.py

if [ "$CUDA" = 1 ]; then
    BENCH_ARGS=(--json "$LOGS/kernel_bench.json")
    [ "$MODE" = "--sweep" ] && BENCH_ARGS+=(--sweep)
    step "kernel benchmark" 120 "$LOGS/kernel_bench.txt" "$PY" -m quant.kernels.bench "${BENCH_ARGS[@]}"
else
    skip "kernel benchmark" "CUDA only"
fi

step "CUDA end-to-end tests" 150 "$LOGS/tests.log" "${PYTEST[@]}" tests/test_cuda.py

# The bundled model: decode is launch-bound at its size (hidden 256), so this shows the
# runtime's overhead and the copy engine, not the kernels' bandwidth.
SMALL=(--repeats 2 --gen-len 64)
[ "$CUDA" = 0 ] && SMALL=(--repeats 1 --gen-len 16 --prompt-len 64)
# on CUDA bench's budget (--cache-fraction 0.5) is a real one: resident and transformers
# need a budget of their own (--vram), or they are skipped
UPPER=(--vram 64GB)
[ "$CUDA" = 0 ] && UPPER=()
step "promoe bench, bundled model" 150 "$LOGS/promoe_bench.txt" "${PROMOE[@]}" bench \
    --configs on-demand,lfu,cross-layer,accelerate "${SMALL[@]}"
step "the same, upper bounds" 60 "$LOGS/promoe_bench.txt" "${PROMOE[@]}" bench \
    "${UPPER[@]}" --configs resident,transformers "${SMALL[@]}"
PROMOE_KERNELS=0 step "the same, PROMOE_KERNELS=0" 60 "$LOGS/promoe_bench.txt" "${PROMOE[@]}" bench \
    "${UPPER[@]}" --configs resident "${SMALL[@]}"

# Mixtral-8x7B's expert shapes in 4 layers: int4 experts of 88 MB, so copies and kernels
# run at the sizes that matter; random weights, so routing is not a trained model's.
BIG=$PROMOE_HOME/models/mixtral-shapes
DIMS="hidden_size=4096, intermediate_size=14336, num_hidden_layers=4, num_attention_heads=32"
BIG_BENCH=(--repeats 2 --prompt-len 128 --gen-len 32)
if [ "$CUDA" = 0 ]; then
    BIG=$PROMOE_HOME/models/mixtral-shapes-toy
    DIMS="hidden_size=256, intermediate_size=896, num_hidden_layers=4, num_attention_heads=8"
    BIG_BENCH=(--repeats 1 --prompt-len 32 --gen-len 8)
fi
# Initialized on the GPU when there is one (torch's CPU normal_ in bf16 takes ~18 s per
# 1.6B parameters); saved as bf16 safetensors like a real checkpoint.
export BIG DIMS
build_big() {
    [ -f "$BIG/config.json" ] && return 0
    mkdir -p "$(dirname "$BIG")"  # else build_tiny_model builds in $TMPDIR, where the cleanup below never looks
    rm -rf "$(dirname "$BIG")/.$(basename "$BIG").tmp-"*  # what a build stopped at its limit left
    "$PY" -c "
import contextlib, os, time, torch
from runtime.tiny import build_tiny_model
torch.set_num_threads(os.cpu_count())
t0 = time.perf_counter()
with torch.device('cuda') if os.environ['CUDA'] == '1' else contextlib.nullcontext():
    build_tiny_model('mixtral', '$BIG', seed=0, dtype='bfloat16', max_shard_size='4GB', $DIMS,
                     num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096)
print(f'built $BIG in {time.perf_counter() - t0:.0f}s')
"
}
export -f build_big
step "build the Mixtral-shaped model" 120 "$LOGS/mixtral_shapes.txt" build_big
if [ -f "$BIG/config.json" ]; then
    step "promoe bench, Mixtral shapes" 200 "$LOGS/mixtral_shapes.txt" "${PROMOE[@]}" bench "$BIG" \
        --configs on-demand,lfu,cross-layer "${BIG_BENCH[@]}"
    step "the same, upper bounds" 120 "$LOGS/mixtral_shapes.txt" "${PROMOE[@]}" bench "$BIG" \
        "${UPPER[@]}" --configs resident,transformers "${BIG_BENCH[@]}"
    PROMOE_KERNELS=0 step "the same, PROMOE_KERNELS=0" 120 "$LOGS/mixtral_shapes.txt" "${PROMOE[@]}" bench \
        "$BIG" --configs cross-layer "${BIG_BENCH[@]}"
    # misses computed by the host's CPU (torch's int4 kernel) where that beats the copy; the
    # GPU reads the same store in torch's CPU layout (quant/kernels/cpu_layout.py), which is
    # converted first (an int4-cpu store beside the int4 one)
    step "bench, Mixtral shapes, host misses" 200 "$LOGS/mixtral_shapes.txt" "${PROMOE[@]}" bench \
        "$BIG" --configs lfu,host-misses "${BIG_BENCH[@]}"
    # a budget with room for fewer experts than layers (Mixtral-8x7B in 6 GB): half the layers
    # stream their experts through one buffer; the stream buffer's copies on the GPU
    STREAM_VRAM=$("$PY" -c "
from runtime.loader import LoadOptions
from runtime.memory_plan import plan_load
p = plan_load('$BIG', LoadOptions(vram=1 << 40, context=512)).plan
n = len(p.slots_per_layer)
print(p.reserved + p.non_expert + p.kv_cache + p.workspace + (n // 2 + 1) * p.expert_bytes)" 2>/dev/null)
    if [ -n "$STREAM_VRAM" ]; then
        step "bench, Mixtral shapes, streaming" 150 "$LOGS/mixtral_shapes.txt" "${PROMOE[@]}" bench \
            "$BIG" --vram "${STREAM_VRAM}B" --context 512 --configs lfu,host-misses "${BIG_BENCH[@]}"
    else
        skip "bench, Mixtral shapes, streaming" "no plan for $BIG"
    fi
else
    skip "promoe bench, Mixtral shapes" "no model was built"
fi

echo "== done in $((SECONDS - START))s; logs in $LOGS/" | tee -a "$SUMMARY"
exit "$failed"
