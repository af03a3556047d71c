"""Time the quantized-expert kernels on a CUDA device: ``python -m quant.kernels.bench``.

Prints, for Mixtral-8x7B expert shapes (hidden 4096, intermediate 14336):

1. the device's memory bandwidth, measured by a large device-to-device copy (bytes read
   plus bytes written);
2. one linear at T = 1 for each format and path, as time and as GB/s of *stored* bytes
   (codes + scales + zeros: what the kernel has to read), next to that bandwidth;
3. one decode layer's experts (top-2, T = 1: gate_up, SiLU gate, down) with the fused
   kernel vs dequantize-then-matmul vs the plain-torch reference.

Paths: ``fused`` is the decode path of ``fmt.linear`` (Triton GEMV for int4/int8,
``bnb.matmul_4bit`` for nf4); ``dequant+mm`` writes W in bf16 with the device kernel and
runs one GEMM (the prefill path, forced at T = 1); ``reference`` is ``fmt.dequantize``
in plain torch + ``F.linear``. ``bf16`` is the dense weight through ``F.linear``.

Timing: CUDA events around each call, after warm-up; before each timed call a 512 MiB
buffer is zeroed, which evicts the L2 cache (one expert matrix would otherwise stay in
it) and keeps the GPU busy while the CPU queues the call; medians of ``--iters`` calls.
``--sweep`` also times the GEMV's (BLOCK_N, num_warps) and split-K alternatives;
``--json PATH`` writes every figure.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import statistics
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

from quant import QuantFormat, get_format
from quant.kernels import triton_available

HIDDEN, INTER = 4096, 14336  # Mixtral-8x7B hidden and expert intermediate sizes
SHAPES = [(INTER, HIDDEN), (HIDDEN, INTER)]  # [N, K]: gate or up (w1/w3), and down (w2)
FORMATS = ["int4", "int8", "nf4", "int4-cpu"]  # int4-cpu: torch's CPU int4 layout (--host-misses)
TOP_K = 2
DEVICE = "cuda"  # the tests run the bench functions on "cpu" with a stub timer


class Timer:
    """Median CUDA-event time of a call, with the L2 cache flushed before each one."""

    def __init__(self, warmup: int, iters: int) -> None:
        self.warmup, self.iters = warmup, iters
        self.flush = torch.empty(512 << 20, dtype=torch.uint8, device=DEVICE)

    def __call__(self, fn: Callable[[], object]) -> float:
        """Median milliseconds of ``fn()``."""
        for _ in range(self.warmup):
            fn()
        torch.cuda.synchronize()
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(self.iters)
        ]
        for start, end in events:
            self.flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()  # every event has completed before any is read
        return statistics.median(start.elapsed_time(end) for start, end in events)


def copy_bandwidth(timer: Timer, nbytes: int = 2 << 30) -> float:
    """GB/s of a device-to-device copy of ``nbytes``, counting bytes read and written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * nbytes / ms / 1e6


def bench_format(name: str) -> QuantFormat:
    """A format by name; ``int4-cpu`` is int4 in torch's CPU layout (the store ``--host-misses`` keeps)."""
    if name == "int4-cpu":
        from quant.cpu_int4 import Int4CpuPacked

        return Int4CpuPacked()
    return get_format(name)


def quantize(fmt: QuantFormat, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """``fmt``'s parts of ``w`` on ``w``'s device (int4-cpu packs on the CPU)."""
    return {k: v.to(w.device) for k, v in fmt.quantize(w).items()}


def linear_paths(fmt: QuantFormat, parts: dict, shape: tuple[int, int]) -> dict[str, Callable]:
    """``{path: fn(x) -> y}`` for one quantized matrix."""
    from quant.cpu_int4 import LAYOUTS, Int4CpuPacked
    from quant.formats import GroupwiseInt

    paths = {"fused": lambda x: fmt.linear(x, parts, shape)}
    if isinstance(fmt, Int4CpuPacked):
        if triton_available():
            from quant.kernels import cpu_layout

            block, pairing = LAYOUTS[fmt.layout]
            halves = pairing == "halves"
            paths["dequant+mm"] = lambda x: F.linear(
                x, cpu_layout.dequantize(parts, shape, x.dtype, block=block, halves=halves)
            )
    elif isinstance(fmt, GroupwiseInt):
        if triton_available():
            from quant.kernels.groupwise import dequantize

            def dequant_mm(x):
                w = dequantize(parts, shape, x.dtype, bits=fmt.bits, group_size=fmt.group_size)
                return F.linear(x, w)

            paths["dequant+mm"] = dequant_mm
    else:  # nf4: bitsandbytes' own dequantize kernel
        import bitsandbytes.functional as bnbf

        paths["dequant+mm"] = lambda x: F.linear(
            x, bnbf.dequantize_4bit(parts["q"], fmt.quant_state(parts, shape, x.dtype))
        )
    paths["reference"] = lambda x: QuantFormat.linear(fmt, x, parts, shape)  # dequantize in torch + F.linear
    return paths


def bench_linears(timer: Timer, names: list[str], bandwidth: float) -> list[dict]:
    rows = []
    g = torch.Generator(device=DEVICE).manual_seed(0)
    for shape in SHAPES:
        w = torch.randn(shape, device=DEVICE, dtype=torch.bfloat16, generator=g) * 0.02
        x = torch.randn(1, shape[1], device=DEVICE, dtype=torch.bfloat16, generator=g)
        ms = timer(lambda w=w, x=x: F.linear(x, w))
        rows.append(_row("bf16", "dense", shape, w.numel() * 2, ms, bandwidth))
        for name in names:
            fmt = bench_format(name)
            parts = quantize(fmt, w)
            nbytes = fmt.nbytes(shape, torch.bfloat16)
            for path, fn in linear_paths(fmt, parts, shape).items():
                ms = timer(lambda fn=fn, x=x: fn(x))
                rows.append(_row(name, path, shape, nbytes, ms, bandwidth))
    return rows


def _row(fmt: str, path: str, shape, nbytes: int, ms: float, bandwidth: float) -> dict:
    gbs = nbytes / ms / 1e6
    return {
        "format": fmt,
        "path": path,
        "shape": list(shape),
        "bytes": nbytes,
        "ms": ms,
        "GB/s": gbs,
        "of_copy": gbs / bandwidth,
    }


def bench_layer(timer: Timer, names: list[str]) -> list[dict]:
    """Top-2 experts of one Mixtral layer at T = 1, per format and path."""
    rows = []
    g = torch.Generator(device=DEVICE).manual_seed(1)
    mats = {"gate_up": (2 * INTER, HIDDEN), "down": (HIDDEN, INTER)}
    dense = [
        {m: torch.randn(s, device=DEVICE, dtype=torch.bfloat16, generator=g) * 0.02 for m, s in mats.items()}
        for _ in range(TOP_K)
    ]
    x = torch.randn(1, HIDDEN, device=DEVICE, dtype=torch.bfloat16, generator=g)

    def layer(linears):  # linears[e][m](x): expert e, matrix m
        y = torch.zeros_like(x)
        for lin in linears:
            h = lin["gate_up"](x)  # [1, 2I]
            h = F.silu(h[:, :INTER]) * h[:, INTER:]  # [1, I]
            y += lin["down"](h)  # [1, H]
        return y

    linears = [{m: (lambda a, w=e[m]: F.linear(a, w)) for m in mats} for e in dense]
    rows.append({"format": "bf16", "path": "dense", "ms": timer(lambda: layer(linears))})
    for name in names:
        fmt = bench_format(name)
        experts = [{m: linear_paths(fmt, quantize(fmt, e[m]), mats[m]) for m in mats} for e in dense]
        for path in experts[0]["gate_up"]:
            linears = [{m: e[m][path] for m in mats} for e in experts]
            rows.append({"format": name, "path": path, "ms": timer(lambda linears=linears: layer(linears))})
    return rows


def sweep(timer: Timer, bandwidth: float) -> list[dict]:
    """GEMV (BLOCK_N, num_warps) x split-K alternatives for int4 and int8 at T = 1."""
    from quant.kernels.groupwise import gemv

    rows = []
    g = torch.Generator(device=DEVICE).manual_seed(2)
    for name in ("int4", "int8"):
        fmt = get_format(name)
        for shape in SHAPES:
            parts = fmt.quantize(torch.randn(shape, device=DEVICE, generator=g))
            x = torch.randn(1, shape[1], device=DEVICE, dtype=torch.bfloat16, generator=g)
            nbytes = fmt.nbytes(shape, torch.bfloat16)
            for block_n, warps, split_k in itertools.product(
                (8, 16, 32, 64), (1, 2, 4, 8), (None, 1, 2, 4, 8)
            ):
                fn = functools.partial(
                    gemv, x, parts, shape, None, bits=fmt.bits, group_size=fmt.group_size,
                    split_k=split_k, config=(block_n, warps),
                )  # fmt: skip
                path = f"gemv BN={block_n} warps={warps} split={split_k or 'auto'}"
                rows.append(_row(name, path, shape, nbytes, timer(fn), bandwidth))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m quant.kernels.bench",
        description="Time the quantized-expert kernels on a CUDA device.",
    )
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument(
        "--sweep", action="store_true", help="also time the GEMV's block and split-K alternatives"
    )
    ap.add_argument("--json", help="write every figure to this file")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to time", file=sys.stderr)
        return 1
    names = [n for n in args.formats.split(",") if n]
    if "nf4" in names:
        try:  # one small round trip: bitsandbytes imports without a native library for this CUDA
            from quant import get_format

            nf4, w = get_format("nf4"), torch.randn(64, 64, device="cuda")
            nf4.dequantize(nf4.quantize(w), w.shape, torch.bfloat16)
        except ImportError:
            print("bitsandbytes is not installed: nf4 left out", file=sys.stderr)
            names.remove("nf4")
        except RuntimeError as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
            print(f"bitsandbytes fails on this device ({first}): nf4 left out", file=sys.stderr)
            names.remove("nf4")
    if "int4-cpu" in names:
        from quant.cpu_int4 import kernel_available

        if not kernel_available():
            print("this torch has no CPU int4 kernel promoe reads: int4-cpu left out", file=sys.stderr)
            names.remove("int4-cpu")

    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, "
          f"triton {'yes' if triton_available() else 'NO (fused int4/int8 fall back to the reference)'}")  # fmt: skip
    torch.backends.cuda.matmul.allow_tf32 = True
    timer = Timer(args.warmup, args.iters)
    with torch.inference_mode():
        bandwidth = copy_bandwidth(timer)
        print(f"device-to-device copy: {bandwidth:.0f} GB/s (read + write)\n")
        linears = bench_linears(timer, names, bandwidth)
        print(f"one linear, T = 1 (median of {args.iters}, L2 flushed before each)")
        print(f"{'format':8} {'path':11} {'N x K':>12} {'MB read':>8} {'us':>9} {'GB/s':>7} {'of copy':>8}")
        for r in linears:
            n, k = r["shape"]
            print(f"{r['format']:8} {r['path']:11} {f'{n}x{k}':>12} {r['bytes'] / 1e6:8.1f} "
                  f"{r['ms'] * 1e3:9.1f} {r['GB/s']:7.0f} {r['of_copy']:8.0%}")  # fmt: skip
        layer = bench_layer(timer, names)
        print(f"\none decode layer's experts: top-{TOP_K}, T = 1, gate_up + SiLU gate + down")
        for r in layer:
            print(f"{r['format']:8} {r['path']:11} {r['ms'] * 1e3:9.1f} us")
        sweeps = sweep(timer, bandwidth) if args.sweep else []
        if sweeps:
            print("\nGEMV alternatives, T = 1 (best first per format and shape)")
            key = lambda r: (r["format"], r["shape"], r["ms"])  # noqa: E731
            for r in sorted(sweeps, key=key):
                n, k = r["shape"]
                print(
                    f"{r['format']:5} {f'{n}x{k}':>11} {r['path']:32} {r['ms'] * 1e3:8.1f} us {r['GB/s']:6.0f} GB/s"
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "device": props.name,
                    "copy_GB/s": bandwidth,
                    "linear": linears,
                    "layer": layer,
                    "sweep": sweeps,
                },
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
