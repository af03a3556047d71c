"""int4 in torch's own CPU layout, computed by torch's CPU int4 kernel.

``torch.ops.aten._weight_int4pack_mm_for_cpu`` multiplies bf16 activations by 4-bit
weights 12x to 20x faster on a CPU than dequantizing and multiplying in plain torch
(0.2 -> 0.017 ms for the bundled model's 512x256 gate_up, 158 -> 8.8 ms for a Mixtral
28672x4096 one, 2-core VM with AVX-512). It reads its own layout, so when the CPU
computes experts (it is the device, or computes misses beside a GPU with
``--host-misses``, whose GPU then reads this layout too: :mod:`quant.kernels.cpu_layout`)
the int4 store is kept in that layout (``int4-cpu``):

* ``q`` ``uint8 [N, K/2]``: the 4-bit codes as ``_convert_weight_to_int4pack_for_cpu``
  packs them, which depends on the CPU torch runs on (found at first use, see
  :data:`LAYOUTS`): per block of output rows, column-major, each byte two rows' codes;
* ``sz`` ``bfloat16 [K/64, N, 2]``: each group's (scale, zero) with
  ``w = (q - 8) * scale + zero``.

The codes, scales and zeros are int4's own (asymmetric, groups of 64), with the zero
shifted by ``8 * scale`` and both rounded to bf16; the activations are rounded to bf16
for the kernel. Only for weights whose both dimensions are multiples of 64 (every
supported MoE). :meth:`dequantize` is the plain-torch reference on any device. The
layout found is part of the store's settings, so a store packed for another CPU is
rebuilt, never misread.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from quant import base
from quant.base import Part, QuantFormat
from quant.kernels import kernels_enabled, use_kernels
from quant.packing import unpack

GROUP = 64
BLOCK_ROWS = 64  # row blocks are cut at multiples of 64, which every layout's block divides

#: How ``_convert_weight_to_int4pack_for_cpu`` packs, per CPU capability (torch 2.13):
#: (rows per block, how a byte pairs them): "halves" holds rows j and j + block/2 (low,
#: high nibble), "adjacent" rows 2j and 2j + 1.
LAYOUTS = {"avx512": (64, "halves"), "avx2": (32, "halves"), "default": (32, "adjacent")}


def _unpack_codes(q: torch.Tensor, n: int, k: int, layout: str) -> torch.Tensor:
    """The 4-bit codes ``[N, K]`` (uint8) of ``q`` packed in ``layout``."""
    block, pairing = LAYOUTS[layout]
    b = q.reshape(n // block, k, block // 2)  # [N/block, K, block/2]
    lo, hi = b & 0xF, b >> 4
    both = torch.cat([lo, hi], dim=-1) if pairing == "halves" else torch.stack([lo, hi], dim=-1)
    return both.reshape(n // block, k, block).transpose(1, 2).reshape(n, k)


def _weights(codes: torch.Tensor, sz: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """``(q - 8) * scale + zero`` per group: codes ``[N, K]`` float, ``sz [K/64, N, 2]`` float."""
    scale, zero = sz[..., 0].T.unsqueeze(-1), sz[..., 1].T.unsqueeze(-1)  # [N, G, 1]
    return (codes.reshape(n, k // GROUP, GROUP) - 8).mul_(scale).add_(zero).reshape(n, k)


@functools.cache
def _probe() -> str | None:
    """The layout this torch packs in (a key of LAYOUTS), if its CPU int4 kernel (a private
    aten op) is there and computes ``(q - 8) * scale + zero`` as this module reads it;
    else None (then the int4 store is used)."""
    ops = torch.ops.aten
    if not (
        hasattr(ops, "_weight_int4pack_mm_for_cpu") and hasattr(ops, "_convert_weight_to_int4pack_for_cpu")
    ):
        return None
    n = k = 128
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32)
    sz = torch.stack(
        [torch.rand(k // GROUP, n, generator=g) + 0.5, torch.randn(k // GROUP, n, generator=g)], -1
    )
    x = torch.randn(3, k, generator=g)
    try:
        q = ops._convert_weight_to_int4pack_for_cpu(codes, 8)
        y = ops._weight_int4pack_mm_for_cpu(x.bfloat16(), q, GROUP, sz.bfloat16()).float()
    except (RuntimeError, NotImplementedError):
        return None
    if q.dtype != torch.uint8 or tuple(q.shape) != (n, k // 2):
        return None
    for name in LAYOUTS:
        if torch.equal(_unpack_codes(q, n, k, name).int(), codes):
            want = x.bfloat16().float() @ _weights(codes.float(), sz.bfloat16().float(), n, k).T
            return name if ((y - want).norm() / want.norm()).item() < 2e-2 else None
    return None


def _kernel_mm(x: torch.Tensor, q: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
    """torch's CPU int4 kernel: ``x [T, K]`` bf16 times the weight packed in ``q``/``sz``."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, q, GROUP, sz)


def kernel_available() -> bool:
    """Whether this torch has the CPU int4 kernel, packing in a layout this module reads."""
    return _probe() is not None


def fits(shape: tuple[int, int]) -> bool:
    return shape[0] % BLOCK_ROWS == 0 and shape[1] % GROUP == 0


class Int4CpuPacked(QuantFormat):
    """int4 (asymmetric, groups of 64) laid out for torch's CPU int4 kernel."""

    name = "int4"
    store_name = "int4-cpu"
    description = "int4 in torch's CPU layout (for experts the CPU computes)"

    def __init__(self, layout: str | None = None) -> None:
        from quant.formats import GroupwiseInt

        self._int4 = GroupwiseInt(4, group_size=GROUP)
        layout = layout or _probe()
        if layout is None:
            raise RuntimeError("this torch has no CPU int4 kernel that promoe can read; use int4")
        self.layout = layout  # how q is packed (the reference reads any of them)

    def params(self) -> dict[str, Any]:
        # how torch packs on this CPU: a store packed otherwise is stale (rebuilt), never misread
        return {**self._int4.params(), "layout": "torch-cpu-int4pack", "packing": self.layout,
                "scale_dtype": "bfloat16"}  # fmt: skip

    def parts(self, shape, dtype):
        n, k = shape
        return [Part("q", (n, k // 2), torch.uint8), Part("sz", (k // GROUP, n, 2), torch.bfloat16)]

    def quantize(self, weight):
        self._check(tuple(weight.shape))  # before quantizing, which takes the time
        # int4's codes, scales and zeros, on the weight's device (a GPU converts faster) ...
        return self.repack(self._int4.quantize(weight), tuple(weight.shape))

    def _check(self, shape: tuple[int, int]) -> None:
        if not fits(shape):
            raise ValueError(f"{self.store_name} needs both dimensions a multiple of 64, not {shape}")
        if self.layout != _probe():
            raise RuntimeError(f"this torch does not pack in the {self.layout} layout")

    def repack_source(self):
        """int4 itself: its store holds these codes, so a store of this layout is built from
        it, a few times faster than from the checkpoint (no quantizing, a quarter the bytes read)."""
        return self._int4

    def repack(self, parts, shape):
        self._check(tuple(shape))
        n, k = shape
        packed = parts["q"].cpu()  # [N, K/2], two codes a byte; ... torch packs on the CPU,
        q = torch.empty((n, k // 2), dtype=torch.uint8)
        rows = self.block_rows(max(1, base.CPU_BLOCK_ELEMENTS // k))  # ... a block of rows at a time:
        for r in range(0, n, rows):  # int32 codes of a whole Mixtral matrix would take 470 MB
            codes = unpack(packed[r : r + rows], 4, k).to(torch.int32)  # [rows, K]
            q[r : r + rows] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 8)
        scale, zero = parts["scale"].cpu().float(), parts["zero"].cpu().float()  # [N, G]
        sz = torch.stack([scale, zero + 8 * scale], dim=-1).transpose(0, 1)  # [G, N, 2]
        return {"q": q, "sz": sz.to(torch.bfloat16).contiguous()}

    def dequantize(self, parts, shape, dtype):
        n, k = shape
        codes = _unpack_codes(parts["q"], n, k, self.layout)  # [N, K]
        return _weights(codes.float(), parts["sz"].float(), n, k).to(dtype)

    def row_block(self, parts, shape, start, stop):
        """Whole blocks of 64 rows, which are rows of ``q`` and columns of ``sz``."""
        if start % BLOCK_ROWS or (stop % BLOCK_ROWS and stop != shape[0]):
            return None
        return {"q": parts["q"][start:stop], "sz": parts["sz"][:, start:stop]}

    def block_rows(self, rows: int) -> int:
        return max(BLOCK_ROWS, rows // BLOCK_ROWS * BLOCK_ROWS)

    def linear(self, x, parts, shape, bias=None):
        if use_kernels(x):  # beside a GPU (--host-misses): Triton kernels that read this layout
            from quant.kernels.cpu_layout import linear

            block, pairing = LAYOUTS[self.layout]
            return linear(x, parts, shape, bias, block=block, halves=pairing == "halves")
        if x.device.type != "cpu" or not kernels_enabled() or self.layout != _probe():
            return super().linear(x, parts, shape, bias)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, shape[1]).to(torch.bfloat16).contiguous()  # [T, K]
        # the kernel ignores strides: a view that is not contiguous would be misread
        q, sz = parts["q"].contiguous(), parts["sz"].contiguous()
        y = _kernel_mm(x2, q, sz).to(x.dtype)  # [T, N]
        if bias is not None:
            y = y + bias.to(x.dtype)
        return y.reshape(*lead, shape[0])


def cpu_variant(fmt: QuantFormat, shapes: list[tuple[int, int]]) -> QuantFormat:
    """``fmt`` for experts the CPU computes (the CPU is the device, or misses computed on
    the host beside a GPU, which then reads this layout with :mod:`quant.kernels.cpu_layout`):
    int4 in torch's CPU layout where that kernel runs and every matrix fits it, else ``fmt``."""
    from quant.formats import GroupwiseInt

    plain_int4 = isinstance(fmt, GroupwiseInt) and fmt.params() == GroupwiseInt(4, group_size=GROUP).params()
    if plain_int4 and kernels_enabled() and all(fits(s) for s in shapes) and kernel_available():
        return Int4CpuPacked()
    return fmt
