"""Kernels of quant/kernels (and bitsandbytes' for nf4) against the plain-torch reference.

Three groups:

* always: dispatch on the CPU runs the reference exactly, and ``import quant`` pulls in
  neither triton nor bitsandbytes;
* ``TRITON_INTERPRET=1`` with triton installed (``scripts/gpu_check.sh --interpret``):
  the Triton kernels run in Triton's interpreter on CPU tensors, which checks their
  index arithmetic and masks without a GPU (not their speed, nor the GPU compiler);
* ``cuda`` marker, skipped without a CUDA device (``scripts/gpu_check.sh``): the same
  comparisons on the GPU, through each format's ``linear()`` dispatch.

The reference is ``F.linear(x, fmt.dequantize(parts), bias)`` computed in float32; a
kernel passes when ``||y - ref|| / ||ref|| <= 1e-2``.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from quant import get_format
from quant.kernels import triton_available, use_kernels

RTOL = 1e-2
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" and triton_available()
interpret = pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 and triton installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")  # bitsandbytes

# (N, K): multiples of everything; K not a multiple of the group (64) nor of BLOCK_K (128);
# N not a multiple of BLOCK_N (32); few rows and long K (split-K on most GPUs)
GPU_SHAPES = [(256, 512), (300, 520), (1000, 200), (512, 4096), (96, 2880)]
INTERP_SHAPES = [(64, 128), (40, 200), (33, 72)]
DECODE_T = [1, 2, 5, 8]
PREFILL_T = [16, 100, 512]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _case(name: str, shape: tuple[int, int], T: int, with_bias: bool, seed: int = 0):
    """Quantized parts of a random ``W [N, K]``, ``x [T, K]``, optional bias, float32 reference."""
    fmt = get_format(name)
    N, K = shape
    g = _gen(seed)
    parts = fmt.quantize(torch.randn(shape, generator=g) * 0.05)
    x = torch.randn(T, K, generator=g)
    bias = torch.randn(N, generator=g) if with_bias else None
    ref = F.linear(x, fmt.dequantize(parts, shape, torch.float32), bias)  # [T, N]
    return fmt, parts, x, bias, ref


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float().cpu() - ref).norm() / ref.norm()).item()


# -- always ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["int8", "int4", "int3", "int2", "nf4"])
@pytest.mark.parametrize("T", [1, 5, 16])
def test_cpu_dispatch_is_the_reference(name, T):
    fmt, parts, x, bias, ref = _case(name, (40, 200), T, with_bias=True)
    assert not use_kernels(x)
    torch.testing.assert_close(fmt.linear(x, parts, (40, 200), bias), ref, rtol=0, atol=0)
    y3 = fmt.linear(x.reshape(1, T, 200), parts, (40, 200), bias)  # [..., K] leading dims kept
    torch.testing.assert_close(y3, ref.reshape(1, T, 40), rtol=0, atol=0)


def test_kernels_can_be_turned_off_and_skip_old_gpus(monkeypatch):
    from quant import kernels

    x = SimpleNamespace(is_cuda=True, device=SimpleNamespace(index=0))  # stands in for a CUDA tensor
    monkeypatch.setattr("quant.kernels.triton_available", lambda: True)
    capability = {"now": (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability["now"])
    kernels._capable.cache_clear()
    assert use_kernels(x)
    monkeypatch.setenv("PROMOE_KERNELS", "0")
    assert not use_kernels(x)
    monkeypatch.delenv("PROMOE_KERNELS")
    capability["now"] = (7, 2)  # Jetson Xavier (Volta): older than the kernels are built for
    kernels._capable.cache_clear()
    assert not use_kernels(x)
    kernels._capable.cache_clear()


def test_kernels_need_triton_and_take_turing_itself(monkeypatch):
    """Capability 7.5 (Turing, MIN_CAPABILITY) is the oldest GPU the kernels run on, so it
    gets them; without triton no GPU does (found unchecked by a mutation audit)."""
    from quant import kernels

    x = SimpleNamespace(is_cuda=True, device=SimpleNamespace(index=0))  # stands in for a CUDA tensor
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (7, 5))
    monkeypatch.setattr("quant.kernels.triton_available", lambda: True)
    kernels._capable.cache_clear()
    try:
        assert use_kernels(x)
        monkeypatch.setattr("quant.kernels.triton_available", lambda: False)
        assert not use_kernels(x)
    finally:
        kernels._capable.cache_clear()


def test_kernels_are_only_claimed_for_the_codes_they_decode():
    """The kernels decode symmetric int8 and asymmetric int4 (scale and zero); any other
    combination must run the reference, or it would be decoded wrong."""
    from quant.kernels import groupwise_supported

    assert groupwise_supported(8, 64, symmetric=True) and groupwise_supported(4, 64, symmetric=False)
    assert not groupwise_supported(8, 64, symmetric=False) and not groupwise_supported(4, 64, symmetric=True)
    assert not groupwise_supported(3, 64, symmetric=False) and not groupwise_supported(4, 48, symmetric=False)
    for name in ("int8", "int4"):
        fmt = get_format(name)
        assert groupwise_supported(fmt.bits, fmt.group_size, fmt.symmetric)


def test_import_quant_loads_neither_triton_nor_bitsandbytes():
    code = (
        "import sys, quant, quant.formats, quant.kernels, quant.nf4;"
        "print(sorted(m for m in ('triton', 'bitsandbytes') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_bench_runs_on_cpu_with_a_stub_timer(monkeypatch):
    """The GPU benchmark's bookkeeping, at toy sizes on the CPU (its timings need CUDA)."""
    from quant.kernels import bench

    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "HIDDEN", 64)
    monkeypatch.setattr(bench, "INTER", 96)
    monkeypatch.setattr(bench, "SHAPES", [(96, 64), (64, 96)])
    monkeypatch.setattr(bench, "triton_available", lambda: INTERPRET)  # compiled Triton needs CUDA tensors

    def timer(fn):
        fn()
        return 0.5  # ms

    rows = bench.bench_linears(timer, ["int4", "int8", "nf4"], bandwidth=100.0)
    paths = {(r["format"], r["path"]) for r in rows}
    assert {("bf16", "dense"), ("int4", "fused"), ("int4", "reference"), ("nf4", "dequant+mm")} <= paths
    int4 = next(r for r in rows if r["format"] == "int4")
    assert int4["GB/s"] == pytest.approx(get_format("int4").nbytes((96, 64), torch.bfloat16) / 0.5e6)
    layer = bench.bench_layer(timer, ["int4", "nf4"])
    assert {(r["format"], r["path"]) for r in layer} >= {
        ("bf16", "dense"),
        ("int4", "fused"),
        ("nf4", "fused"),
    }


def test_bench_times_int4_in_the_cpu_layout(monkeypatch):
    """The GPU benchmark's int4-cpu rows (the store --host-misses keeps): quantized on the
    CPU and moved to the bench's device, with a dequant+mm path where triton imports."""
    from quant.cpu_int4 import Int4CpuPacked, kernel_available
    from quant.kernels import bench

    if not kernel_available():
        pytest.skip("this torch has no CPU int4 kernel")
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "HIDDEN", 64)
    monkeypatch.setattr(bench, "INTER", 128)
    monkeypatch.setattr(bench, "SHAPES", [(128, 64), (64, 128)])
    monkeypatch.setattr(bench, "triton_available", lambda: INTERPRET)
    assert isinstance(bench.bench_format("int4-cpu"), Int4CpuPacked)

    def timer(fn):
        fn()
        return 0.5  # ms

    rows = bench.bench_linears(timer, ["int4-cpu"], bandwidth=100.0)
    paths = {r["path"] for r in rows if r["format"] == "int4-cpu"}
    assert paths == ({"fused", "dequant+mm", "reference"} if INTERPRET else {"fused", "reference"})
    assert {r["format"] for r in bench.bench_layer(timer, ["int4-cpu"])} == {"bf16", "int4-cpu"}


# -- Triton interpreter (CPU) ----------------------------------------------------------
@interpret
@pytest.mark.parametrize("name", ["int4", "int8"])
@pytest.mark.parametrize("T", DECODE_T)
def test_interpreted_gemv(name, T):
    from quant.kernels.groupwise import gemv

    for shape, with_bias, split_k in itertools.product(INTERP_SHAPES, (False, True), (None, 2)):
        fmt, parts, x, bias, ref = _case(name, shape, T, with_bias)
        for dtype in (torch.float32, torch.float16):
            b = bias.to(dtype) if with_bias else None
            y = gemv(x.to(dtype), parts, shape, b, bits=fmt.bits, group_size=fmt.group_size, split_k=split_k)
            case = f"{shape=} {with_bias=} {split_k=} {dtype=}"
            assert y.shape == (T, shape[0]) and y.dtype == dtype, case
            assert _rel(y, ref) <= RTOL, case


@interpret
@pytest.mark.parametrize("name", ["int4", "int8"])
@pytest.mark.parametrize("shape", INTERP_SHAPES)
def test_interpreted_dequantize(name, shape):
    from quant.kernels.groupwise import dequantize

    fmt = get_format(name)
    parts = fmt.quantize(torch.randn(shape, generator=_gen(1)))
    want = fmt.dequantize(parts, shape, torch.float32)
    w = dequantize(parts, shape, torch.float32, bits=fmt.bits, group_size=fmt.group_size)
    torch.testing.assert_close(w, want, rtol=1e-6, atol=1e-6)


@interpret
@pytest.mark.parametrize("name", ["int4", "int8"])
@pytest.mark.parametrize("T", [1, 8, 16, 100])
def test_interpreted_groupwise_linear(name, T):
    from quant.kernels.groupwise import groupwise_linear

    fmt, parts, x, bias, ref = _case(name, (40, 200), T, with_bias=True)
    y = groupwise_linear(x, parts, (40, 200), bias, bits=fmt.bits, group_size=fmt.group_size)
    assert _rel(y, ref) <= RTOL


# int4 in torch's CPU layout (quant.cpu_int4), read on the GPU beside --host-misses: parts
# packed here in each layout torch uses on some CPU, not only this one's
CPU_LAYOUT_SHAPES = [(64, 64), (128, 192), (192, 128)]


def _cpu_layout_case(layout: str, shape: tuple[int, int], seed: int = 0):
    """Int4CpuPacked(layout) and its parts for random codes, scales and zeros (packed here as
    torch packs them on a CPU with that layout: per block of rows, column-major, two rows a byte)."""
    from quant.cpu_int4 import LAYOUTS, Int4CpuPacked, _unpack_codes

    N, K = shape
    block, pairing = LAYOUTS[layout]
    g = _gen(seed)
    codes = torch.randint(0, 16, shape, generator=g, dtype=torch.uint8)
    b = codes.reshape(N // block, block, K).transpose(1, 2)  # [N/B, K, B]
    lo, hi = (
        (b[..., : block // 2], b[..., block // 2 :]) if pairing == "halves" else (b[..., 0::2], b[..., 1::2])
    )
    q = (lo | hi << 4).contiguous().reshape(N, K // 2)
    assert torch.equal(_unpack_codes(q, N, K, layout), codes)  # the reference reads what was packed
    scale = torch.rand(K // 64, N, generator=g) * 0.02 + 0.005
    sz = torch.stack([scale, torch.randn(K // 64, N, generator=g) * 0.05], -1).to(torch.bfloat16)
    return Int4CpuPacked(layout), {"q": q, "sz": sz}, block, pairing == "halves"


@interpret
@pytest.mark.parametrize("layout", ["avx512", "avx2", "default"])
@pytest.mark.parametrize("T", DECODE_T)
def test_interpreted_cpu_layout_gemv(layout, T):
    from quant.kernels.cpu_layout import gemv

    for shape, with_bias, split_k in itertools.product(CPU_LAYOUT_SHAPES, (False, True), (None, 2)):
        fmt, parts, block, halves = _cpu_layout_case(layout, shape, seed=T)
        x = torch.randn(T, shape[1], generator=_gen(T))
        bias = torch.randn(shape[0], generator=_gen(T + 1)) if with_bias else None
        ref = F.linear(x, fmt.dequantize(parts, shape, torch.float32), bias)
        for dtype in (torch.float32, torch.float16):
            b = bias.to(dtype) if with_bias else None
            y = gemv(x.to(dtype), parts, shape, b, block=block, halves=halves, split_k=split_k)
            case = f"{shape=} {with_bias=} {split_k=} {dtype=}"
            assert y.shape == (T, shape[0]) and y.dtype == dtype, case
            assert _rel(y, ref) <= RTOL, case


@interpret
@pytest.mark.parametrize("layout", ["avx512", "avx2", "default"])
@pytest.mark.parametrize("shape", CPU_LAYOUT_SHAPES)
def test_interpreted_cpu_layout_dequantize_and_linear(layout, shape):
    from quant.kernels.cpu_layout import dequantize, linear

    fmt, parts, block, halves = _cpu_layout_case(layout, shape)
    want = fmt.dequantize(parts, shape, torch.float32)
    torch.testing.assert_close(dequantize(parts, shape, torch.float32, block=block, halves=halves), want)
    bias = torch.randn(shape[0], generator=_gen(7))
    for T in (1, 8, 16, 100):  # the GEMV, then dequantize + F.linear; with a bias, added once
        x = torch.randn(T, shape[1], generator=_gen(T))
        assert _rel(linear(x, parts, shape, None, block=block, halves=halves), F.linear(x, want)) <= RTOL
        got = linear(x, parts, shape, bias, block=block, halves=halves)
        assert _rel(got, F.linear(x, want, bias)) <= RTOL
    x3 = torch.randn(2, 3, shape[1], generator=_gen(9))  # leading dims kept
    assert linear(x3, parts, shape, None, block=block, halves=halves).shape == (2, 3, shape[0])
    assert linear(x3[:, :0], parts, shape, None, block=block, halves=halves).shape == (2, 0, shape[0])


@interpret
def test_interpreted_host_misses_read_one_store_in_the_cpu_layout(tiny_model, monkeypatch):
    """The GPU side of --host-misses, with Triton's interpreter standing in for the GPU:
    experts in the cache's slots go through the int4-cpu kernels (a spy on them), misses
    through torch's CPU kernel on the host, and the logits equal the in-place CPU model's."""
    import quant.cpu_int4
    from quant.cpu_int4 import kernel_available
    from runtime.loader import LoadOptions, load_model
    from runtime.miss import MissHandler
    from tests.helpers import load_small

    if not kernel_available():
        pytest.skip("this torch has no CPU int4 kernel")
    path = tiny_model("mixtral", intermediate_size=128)
    x = torch.tensor([[5, 17, 42, 99, 7, 128, 64, 3]])
    ref = load_model(str(path), LoadOptions(quant="int4", device="cpu"))
    try:
        with torch.inference_mode():
            want = [ref.model(input_ids=x).logits, ref.model(input_ids=x[:, :1]).logits]
    finally:
        ref.close()
    # the "GPU" computes in float16, the host in float32: the device's activations (and only
    # they) go to the Triton kernels, as use_kernels picks CUDA tensors
    calls = []
    device_side = lambda t: t.dtype == torch.float16 and not calls.append(t.shape[0])  # noqa: E731
    monkeypatch.setattr(quant.cpu_int4, "use_kernels", device_side)
    # a miss of one token is computed on the host, a bigger one copied into a slot (the cost
    # model's choice is tested in test_miss.py)
    monkeypatch.setattr(
        MissHandler,
        "routes",
        lambda self, layer, misses: {e: "host" if n == 1 else "copy" for e, n, _ in misses},
    )
    lm = load_small(path, quant="int4", slots_per_layer=2, predictor="none", host_misses=True,
                    dtype="float16", max_slots=8)  # fmt: skip
    try:
        assert lm.store.path.name == "int4-cpu"
        with torch.inference_mode():
            got = [lm.model(input_ids=x).logits, lm.model(input_ids=x[:, :1]).logits]
        assert calls, "the slots were not read by the int4-cpu kernels"
        for g, w in zip(got, want, strict=True):
            assert _rel(g, w) < 2e-2  # bf16 activations on the host, fp16 on the "device"
        assert lm.cache.stats.total().cpu_computed > 0
    finally:
        lm.close()


# -- CUDA ------------------------------------------------------------------------------
def _cuda_case(name, shape, T, with_bias, dtype, seed=0):
    fmt, parts, x, bias, ref = _case(name, shape, T, with_bias, seed)
    parts = {k: v.cuda() for k, v in parts.items()}
    x = x.to("cuda", dtype)
    bias = bias.to("cuda", dtype) if with_bias else None
    return fmt, parts, x, bias, ref


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("name", ["int4", "int8", "nf4"])
@pytest.mark.parametrize("T", DECODE_T + PREFILL_T)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_linear_matches_reference(name, T, dtype):
    if name == "nf4":
        pytest.importorskip("bitsandbytes")
    for i, (shape, with_bias) in enumerate(itertools.product(GPU_SHAPES, (False, True))):
        fmt, parts, x, bias, ref = _cuda_case(name, shape, T, with_bias, dtype, seed=i)
        y = fmt.linear(x, parts, shape, bias)
        case = f"{shape=} {with_bias=}"
        assert y.shape == (T, shape[0]) and y.dtype == dtype and y.is_cuda, case
        assert _rel(y, ref) <= RTOL, case


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("name", ["int4", "int8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_dequantize_kernel_matches_reference(name, dtype):
    from quant.kernels.groupwise import dequantize

    fmt = get_format(name)
    for shape in GPU_SHAPES:
        parts = {k: v.cuda() for k, v in fmt.quantize(torch.randn(shape, generator=_gen(2))).items()}
        want = fmt.dequantize(parts, shape, torch.float32).to(dtype)  # reference on the GPU
        w = dequantize(parts, shape, dtype, bits=fmt.bits, group_size=fmt.group_size)
        torch.testing.assert_close(w, want, rtol=1e-2, atol=1e-3, msg=lambda m, shape=shape: f"{shape}: {m}")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("name", ["int4", "int8"])
@pytest.mark.parametrize("split_k", [1, 2, 7])
def test_cuda_gemv_any_split_k(name, split_k):
    from quant.kernels.groupwise import gemv

    fmt, parts, x, bias, ref = _cuda_case(name, (300, 2880), 5, True, torch.bfloat16)
    y = gemv(x, parts, (300, 2880), bias, bits=fmt.bits, group_size=fmt.group_size, split_k=split_k)
    assert _rel(y, ref) <= RTOL


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("T", [1, 8, 16])
def test_cuda_dispatch_takes_the_kernels(monkeypatch, T):
    import quant.kernels.groupwise as kg

    calls = []
    for fn in ("gemv", "dequantize"):
        real = getattr(kg, fn)
        monkeypatch.setattr(kg, fn, lambda *a, _real=real, _fn=fn, **k: calls.append(_fn) or _real(*a, **k))
    fmt, parts, x, bias, ref = _cuda_case("int4", (256, 512), T, False, torch.bfloat16)
    fmt.linear(x, parts, (256, 512), bias)
    assert calls == (["gemv"] if T <= 8 else ["dequantize"])
    monkeypatch.setenv("PROMOE_KERNELS", "0")
    calls.clear()
    assert _rel(fmt.linear(x, parts, (256, 512), bias), ref) <= RTOL
    assert calls == []


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("T", DECODE_T + PREFILL_T)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_cpu_layout_linear_matches_reference(monkeypatch, T, dtype):
    """int4 in torch's CPU layout, read on the GPU: each layout, through Int4CpuPacked.linear's
    dispatch, which must take the kernels (a spy on them)."""
    import quant.kernels.cpu_layout as kc

    calls = []
    for fn in ("gemv", "dequantize"):
        real = getattr(kc, fn)
        monkeypatch.setattr(kc, fn, lambda *a, _real=real, _fn=fn, **k: calls.append(_fn) or _real(*a, **k))
    for i, (layout, shape, with_bias) in enumerate(
        itertools.product(
            ["avx512", "avx2", "default"], [(256, 512), (4096, 1024), (192, 2880)], (False, True)
        )
    ):
        fmt, parts, _, _ = _cpu_layout_case(layout, shape, seed=i)
        x = torch.randn(T, shape[1], generator=_gen(i))
        bias = torch.randn(shape[0], generator=_gen(i + 1)) if with_bias else None
        ref = F.linear(x, fmt.dequantize(parts, shape, torch.float32), bias)
        calls.clear()
        y = fmt.linear(x.to("cuda", dtype), {k: v.cuda() for k, v in parts.items()}, shape,
                       bias.to("cuda", dtype) if with_bias else None)  # fmt: skip
        case = f"{layout} {shape=} {with_bias=}"
        assert y.shape == (T, shape[0]) and y.dtype == dtype and y.is_cuda, case
        assert _rel(y, ref) <= RTOL, case
        assert calls == (["gemv"] if T <= 8 else ["dequantize"]), case


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_cuda_nf4_reference_equals_bitsandbytes(shape):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    fmt = get_format("nf4")
    parts = {k: v.cuda() for k, v in fmt.quantize(torch.randn(shape, generator=_gen(3))).items()}
    state = bnbf.QuantState(
        absmax=parts["absmax"], shape=torch.Size(shape), code=bnbf.get_4bit_type("nf4", device="cuda"),
        blocksize=64, quant_type="nf4", dtype=torch.float32,
    )  # fmt: skip
    # on the CPU the two are equal bit for bit (test_nf4.py); one fp32 product per weight here too
    torch.testing.assert_close(
        bnbf.dequantize_4bit(parts["q"], state),
        fmt.dequantize(parts, shape, torch.float32),
        rtol=1e-6,
        atol=1e-7,
    )
