"""Compile every kernel variant ahead of time, no GPU needed: ``python -m quant.kernels.aot_check``.

Builds each Triton kernel of :mod:`quant.kernels.groupwise` and
:mod:`quant.kernels.cpu_layout` for the given CUDA
capabilities (default 75 80 87 90: T4, A100, Jetson Orin, H100) with every dtype,
bias and token-block combination the launchers can produce, including the
specializations Triton makes when an integer argument equals 1. Prints registers and
local memory (spills) per thread from ``cuobjdump`` (shipped in the triton wheel), and
exits 1 if any build fails. This catches type and constexpr errors and register
pressure that Triton's interpreter does not; it says nothing about speed or results.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from quant.kernels import cpu_layout as kc
from quant.kernels import groupwise as kg

PTR = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}
INTS_GEMV = (
    "T",
    "N",
    "K",
    "G",
    "groups_per_split",
    "stride_xt",
    "stride_qn",
    "stride_sn",
    "stride_os",
    "stride_ot",
)
INTS_DEQUANT = ("N", "K", "stride_qn", "stride_sn", "stride_wn")
INTS_CPU_GEMV = ("T", "N", "K", "groups_per_split", "stride_xt", "stride_os", "stride_ot")
#: torch's CPU int4 layouts (quant.cpu_int4.LAYOUTS): rows per block, and whether a byte holds row halves
CPU_LAYOUTS = ((64, True), (32, True), (32, False))


#: what a GEMV writes: one split writes x's dtype, with a bias or without; split-K writes
#: fp32 partial sums and adds no bias (the launcher then passes ``out`` as the unused bias)
OUTPUTS = (("x", False), ("x", True), ("fp32", False))


def _gemv_outputs(xdt: str, out: str, bias: bool) -> dict[str, str]:
    out_ty = PTR[xdt] if out == "x" else "*fp32"
    return {"bias_ptr": PTR[xdt] if bias else out_ty, "out_ptr": out_ty}


def variants():
    """``(label, kernel, signature, constants, num_warps)`` for every build the launchers can ask for."""
    for bits, xdt, ones, (out, bias), block_t in itertools.product(
        (4, 8), PTR, (False, True), OUTPUTS, (1, 2, 4, 8)
    ):
        block_n, warps = kg.GEMV_CONFIG[bits]
        sig = {"x_ptr": PTR[xdt], "q_ptr": "*u8" if bits == 4 else "*i8", "scale_ptr": "*fp16"}
        if bits == 4:
            sig["zero_ptr"] = "*fp16"
        sig |= _gemv_outputs(xdt, out, bias) | {a: "i32" for a in INTS_GEMV}
        consts = {"GROUP": 64, "BLOCK_T": block_t, "BLOCK_N": block_n, "HAS_BIAS": bias}
        if ones:  # T == 1 and one group per split: Triton turns integer arguments equal to 1 into constants
            consts |= {"T": 1, "groups_per_split": 1}
        kernel = kg._int4_gemv_kernel if bits == 4 else kg._int8_gemv_kernel
        yield (
            f"gemv int{bits} x={xdt} out={out} BLOCK_T={block_t} bias={bias} ones={ones}",
            kernel,
            sig,
            consts,
            warps,
        )
    for bits, wdt in itertools.product((4, 8), PTR):
        sig = {"q_ptr": "*u8" if bits == 4 else "*i8", "scale_ptr": "*fp16"}
        if bits == 4:
            sig["zero_ptr"] = "*fp16"
        sig |= {"w_ptr": PTR[wdt]} | {a: "i32" for a in INTS_DEQUANT}
        consts = {"GROUP": 64, "BLOCK_N": kg.DEQUANT_BLOCK_N, "BLOCK_K": kg.DEQUANT_BLOCK_K}
        kernel = kg._int4_dequant_kernel if bits == 4 else kg._int8_dequant_kernel
        yield f"dequant int{bits} w={wdt}", kernel, sig, consts, kg.DEQUANT_WARPS
    for (block, halves), xdt, ones, (out, bias), block_t in itertools.product(
        CPU_LAYOUTS, PTR, (False, True), OUTPUTS, (1, 2, 4, 8)
    ):
        sig = {"x_ptr": PTR[xdt], "q_ptr": "*u8", "sz_ptr": "*bf16"}
        sig |= _gemv_outputs(xdt, out, bias) | {a: "i32" for a in INTS_CPU_GEMV}
        consts = {"BLOCK": block, "HALVES": halves, "BLOCK_T": block_t, "HAS_BIAS": bias}
        if ones:
            consts |= {"T": 1, "groups_per_split": 1}
        label = f"gemv int4-cpu B={block} halves={halves} x={xdt} out={out} BLOCK_T={block_t} bias={bias} ones={ones}"
        yield label, kc._gemv_kernel, sig, consts, kc.GEMV_WARPS
    for (block, halves), wdt in itertools.product(CPU_LAYOUTS, PTR):
        sig = {
            "q_ptr": "*u8",
            "sz_ptr": "*bf16",
            "w_ptr": PTR[wdt],
            "N": "i32",
            "K": "i32",
            "stride_wn": "i32",
        }
        consts = {"BLOCK": block, "HALVES": halves}
        yield (
            f"dequant int4-cpu B={block} halves={halves} w={wdt}",
            kc._dequant_kernel,
            sig,
            consts,
            kc.DEQUANT_WARPS,
        )


def resource_usage(cubin: bytes) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+).*?LOCAL:(\d+)", out)
    return f"{m.group(1)} registers, {m.group(2)} B local" if m else "usage unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m quant.kernels.aot_check", description=__doc__.splitlines()[0]
    )
    ap.add_argument("capabilities", nargs="*", type=int, default=[75, 80, 87, 90])
    args = ap.parse_args(argv)
    failures = 0
    for cc in args.capabilities:
        for label, kernel, sig, consts, warps in variants():
            sig = sig | {c: "constexpr" for c in consts}
            try:
                build = triton.compile(
                    ASTSource(kernel, sig, consts),
                    target=GPUTarget("cuda", cc, 32),
                    options={"num_warps": warps},
                )
                print(f"ok   sm_{cc} {label}: {resource_usage(build.asm['cubin'])}", flush=True)
            except Exception as exc:  # report every failing variant, not only the first
                failures += 1
                print(f"FAIL sm_{cc} {label}: {type(exc).__name__}: {exc}", flush=True)
    print(f"triton {triton.__version__}: {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
