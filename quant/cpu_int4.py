"""int4 in torch's own CPU layout, computed by torch's CPU int4 kernel.

``torch.ops.aten._weight_int4pack_mm_for_cpu`` multiplies bf16 activations by 4-bit
weights 12x to 20x faster on a CPU than dequantizing and multiplying in plain torch
(0.2 -> 0.017 ms for the bundled model's 512x256 gate_up, 158 -> 8.8 ms for a Mixtral
28672x4096 one, 2-core VM). It reads its own layout, so when the CPU reads experts in
place (no device to copy to) the int4 store is converted into that layout instead:

* ``q`` ``uint8 [N, K/2]``: the 4-bit codes as ``_convert_weight_to_int4pack_for_cpu``
  packs them: per block of 64 output rows, column-major, byte ``j`` of column ``k``
  holding rows ``j`` (low nibble) and ``j + 32`` (high nibble);
* ``sz`` ``bfloat16 [K/64, N, 2]``: each group's (scale, zero) with
  ``w = (q - 8) * scale + zero``.

The codes, scales and zeros are int4's own (asymmetric, groups of 64), with the zero
shifted by ``8 * scale`` and both rounded to bf16; the activations are rounded to bf16
for the kernel. Only for weights whose both dimensions are multiples of 64 (every
supported MoE). :meth:`dequantize` is the plain-torch reference on any device.
"""

from __future__ import annotations

import functools
import hashlib
import os
from typing import Any

import torch

from quant.base import Part, QuantFormat
from quant.packing import unpack

GROUP = 64
BLOCK_ROWS = 64  # the kernel's layout goes in blocks of 64 output rows


@functools.cache
def _probe() -> str | None:
    """A digest of how this torch packs a fixed pattern, if its CPU int4 kernel (a private
    aten op) is there, runs, and packs as :func:`_unpack_codes` reads; else None."""
    ops = torch.ops.aten
    if not (
        hasattr(ops, "_weight_int4pack_mm_for_cpu") and hasattr(ops, "_convert_weight_to_int4pack_for_cpu")
    ):
        return None
    codes = (torch.arange(128 * 128, dtype=torch.int32) * 7 % 16).reshape(128, 128)
    try:
        q = ops._convert_weight_to_int4pack_for_cpu(codes, 8)
        ops._weight_int4pack_mm_for_cpu(torch.zeros(1, 128, dtype=torch.bfloat16), q, GROUP,
                                        torch.zeros(2, 128, 2, dtype=torch.bfloat16))  # fmt: skip
    except (RuntimeError, NotImplementedError):
        return None
    if (
        q.dtype != torch.uint8
        or tuple(q.shape) != (128, 64)
        or not torch.equal(_unpack_codes(q, 128, 128), codes)
    ):
        return None  # another layout than the one this module reads
    return hashlib.sha256(q.numpy().tobytes()).hexdigest()[:16]


def kernel_available() -> bool:
    """Whether this torch has the CPU int4 kernel, and it packs as this module reads."""
    return _probe() is not None


def _unpack_codes(q: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The 4-bit codes ``[N, K]`` (uint8) of the kernel's layout ``q`` (see module doc)."""
    b = q.reshape(n // BLOCK_ROWS, k, BLOCK_ROWS // 2)  # [N/64, K, 32]
    return torch.cat([b & 0xF, b >> 4], dim=-1).transpose(1, 2).reshape(n, k)


def fits(shape: tuple[int, int]) -> bool:
    return shape[0] % BLOCK_ROWS == 0 and shape[1] % GROUP == 0


class Int4CpuPacked(QuantFormat):
    """int4 (asymmetric, groups of 64) laid out for torch's CPU int4 kernel."""

    name = "int4"
    store_name = "int4-cpu"
    description = "int4 in torch's CPU layout (CPU, experts read in place)"

    def __init__(self) -> None:
        from quant.formats import GroupwiseInt

        self._int4 = GroupwiseInt(4, group_size=GROUP)

    def params(self) -> dict[str, Any]:
        # the digest of how this torch packs: a torch that packs otherwise makes the store stale
        return {**self._int4.params(), "layout": "torch-cpu-int4pack", "scale_dtype": "bfloat16",
                "packing": _probe()}  # fmt: skip

    def parts(self, shape, dtype):
        n, k = shape
        return [Part("q", (n, k // 2), torch.uint8), Part("sz", (k // GROUP, n, 2), torch.bfloat16)]

    def quantize(self, weight):
        if not fits(tuple(weight.shape)):
            raise ValueError(
                f"{self.store_name} needs both dimensions a multiple of 64, not {tuple(weight.shape)}"
            )
        n, k = weight.shape
        p = self._int4.quantize(weight)
        codes = unpack(p["q"], 4, k).to(torch.int32)  # [N, K]
        scale, zero = p["scale"].float(), p["zero"].float()  # [N, G]
        sz = torch.stack([scale, zero + 8 * scale], dim=-1).transpose(0, 1)  # [G, N, 2]
        return {"q": torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 8),
                "sz": sz.to(torch.bfloat16).contiguous()}  # fmt: skip

    def dequantize(self, parts, shape, dtype):
        n, k = shape
        codes = _unpack_codes(parts["q"], n, k)  # [N, K]
        sz = parts["sz"].float()  # [G, N, 2]
        scale, zero = sz[..., 0].T.unsqueeze(-1), sz[..., 1].T.unsqueeze(-1)  # [N, G, 1]
        w = (codes.float().reshape(n, k // GROUP, GROUP) - 8).mul_(scale).add_(zero)
        return w.reshape(n, k).to(dtype)

    def row_block(self, parts, shape, start, stop):
        """Whole blocks of 64 rows, which are rows of ``q`` and columns of ``sz``."""
        if start % BLOCK_ROWS or (stop % BLOCK_ROWS and stop != shape[0]):
            return None
        return {"q": parts["q"][start:stop], "sz": parts["sz"][:, start:stop]}

    def block_rows(self, rows: int) -> int:
        return max(BLOCK_ROWS, rows // BLOCK_ROWS * BLOCK_ROWS)

    def linear(self, x, parts, shape, bias=None):
        if x.device.type != "cpu" or os.environ.get("PROMOE_KERNELS", "1") == "0" or not kernel_available():
            return super().linear(x, parts, shape, bias)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, shape[1]).to(torch.bfloat16).contiguous()  # [T, K]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, parts["q"], GROUP, parts["sz"]).to(
            x.dtype
        )  # [T, N]
        if bias is not None:
            y = y + bias.to(x.dtype)
        return y.reshape(*lead, shape[0])


def cpu_variant(fmt: QuantFormat, shapes: list[tuple[int, int]]) -> QuantFormat:
    """``fmt`` for experts the CPU computes from the host store: int4 in torch's CPU layout
    where that kernel runs and every matrix fits it, else ``fmt`` itself."""
    from quant.formats import GroupwiseInt

    plain_int4 = isinstance(fmt, GroupwiseInt) and fmt.params() == GroupwiseInt(4, group_size=GROUP).params()
    if (
        plain_int4
        and all(fits(s) for s in shapes)
        and kernel_available()
        and os.environ.get("PROMOE_KERNELS", "1") != "0"
    ):
        return Int4CpuPacked()
    return fmt
