"""Built-in formats: ``none`` (exact), groupwise ``int8``, ``int4``, ``int3``, ``int2``.

Groupwise integer quantization splits each row of ``W [out, in]`` into groups of
``group_size`` consecutive input columns, each with its own fp16 scale:

* ``int8`` is symmetric: ``q = round(w / s)`` in [-127, 127], ``s = absmax / 127``.
* ``int4``/``int3``/``int2`` are asymmetric: ``q = round((w - zero) / s)`` in
  [0, 2**bits - 1], with ``s = (max - min) / (2**bits - 1)``, ``zero = min``, and the
  codes packed ``8 // bits`` to a byte (int3: 8 codes in 3 bytes), along ``in``.

Input columns are zero-padded to a multiple of the group size; ``dequantize`` drops the
padding. Scales are rounded to fp16 *before* the codes are chosen, so codes and stored
scales agree. ``int3`` and ``int2`` choose each group's range by a squared-error search
over a few shrink factors (:mod:`quant.clip_search`) instead of plain min-max; the stored
layout is the same either way.

On CUDA (with triton importable) ``int4`` and ``int8`` compute :meth:`~QuantFormat.linear`
with the Triton kernels of :mod:`quant.kernels` (fused dequantize-GEMV for up to 8
tokens, dequantize-to-``x.dtype`` then one GEMM beyond); everywhere else, and for the
other formats, with the plain-torch reference. ``nf4`` lives in :mod:`quant.nf4`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from quant import kernels
from quant.base import Part, QuantFormat
from quant.clip_search import search_clip_range
from quant.nf4 import NF4
from quant.packing import pack, packed_len, unpack_float
from quant.registry import register_format


class NoQuant(QuantFormat):
    """Exact: the weight as it came from the checkpoint, in its own dtype."""

    name = "none"
    description = "exact, the checkpoint's own dtype"

    def parts(self, shape, dtype):
        return [Part("w", tuple(shape), dtype)]

    def quantize(self, weight):
        return {"w": weight.contiguous()}

    def dequantize(self, parts, shape, dtype):
        return parts["w"].to(dtype)

    def row_block(self, parts, shape, start, stop):
        return self.rows_of_row_major(parts, start, stop)

    def linear(self, x, parts, shape, bias=None):
        if parts["w"].dtype == x.dtype:  # nothing to convert: one GEMM on the weight itself
            return F.linear(x, parts["w"], bias)
        return super().linear(x, parts, shape, bias)


class GroupwiseInt(QuantFormat):
    """``bits``-bit integers with one fp16 scale (and zero, when asymmetric) per group."""

    def __init__(
        self, bits: int, group_size: int = 64, symmetric: bool = False, clip_search: bool = False
    ) -> None:
        if group_size % 8:
            raise ValueError("group_size must be a multiple of 8")
        self.bits = bits
        self.group_size = group_size
        self.symmetric = symmetric
        self.clip_search = clip_search  # how the range is chosen: same layout, other values
        self.name = f"int{bits}"

    def params(self) -> dict[str, Any]:
        p: dict[str, Any] = {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric}
        if self.clip_search:  # changes the stored values, so a store made without it is stale
            p["clip_search"] = True
        return p

    def _padded(self, n_in: int) -> int:
        g = self.group_size
        return (n_in + g - 1) // g * g

    def parts(self, shape, dtype):
        out, n_in = shape
        n_pad = self._padded(n_in)
        groups = n_pad // self.group_size
        q_dtype = torch.int8 if self.symmetric else torch.uint8
        parts = [
            Part("q", (out, packed_len(n_pad, self.bits)), q_dtype),
            Part("scale", (out, groups), torch.float16),
        ]
        if not self.symmetric:
            parts.append(Part("zero", (out, groups), torch.float16))
        return parts

    def quantize(self, weight):
        out, n_in = weight.shape
        n_pad = self._padded(n_in)
        w = weight.float()
        if n_pad != n_in:
            w = torch.nn.functional.pad(w, (0, n_pad - n_in))
        w = w.reshape(out, n_pad // self.group_size, self.group_size)  # [O, G, g]
        if self.symmetric:
            qmax = 2 ** (self.bits - 1) - 1
            scale = (w.abs().amax(dim=-1) / qmax).clamp_min(1e-8).half()  # [O, G]
            q = torch.round(w / scale.float().unsqueeze(-1)).clamp_(-qmax, qmax).to(torch.int8)
            return {"q": q.reshape(out, n_pad), "scale": scale}
        if self.clip_search:
            q, scale, zero = search_clip_range(w, self.bits)  # [O, G, g], [O, G], [O, G]
            return {"q": pack(q.reshape(out, n_pad), self.bits), "scale": scale, "zero": zero}
        qmax = 2**self.bits - 1
        lo, hi = w.amin(dim=-1), w.amax(dim=-1)
        scale = ((hi - lo) / qmax).clamp_min(1e-8).half()
        zero = lo.half()
        q = torch.round((w - zero.float().unsqueeze(-1)) / scale.float().unsqueeze(-1)).clamp_(0, qmax)
        return {"q": pack(q.to(torch.uint8).reshape(out, n_pad), self.bits), "scale": scale, "zero": zero}

    def dequantize(self, parts, shape, dtype):
        out, n_in = shape
        n_pad = self._padded(n_in)
        g = self.group_size
        scale = parts["scale"].float().unsqueeze(-1)  # [O, G, 1]
        if self.symmetric:
            q = parts["q"].float().reshape(out, n_pad // g, g)
            w = q * scale
        else:
            q = unpack_float(parts["q"], self.bits, n_pad).reshape(out, n_pad // g, g)
            w = q.mul_(scale).add_(parts["zero"].float().unsqueeze(-1))  # q is ours to overwrite
        return w.reshape(out, n_pad)[:, :n_in].to(dtype)

    def row_block(self, parts, shape, start, stop):
        return self.rows_of_row_major(parts, start, stop)

    def linear(self, x, parts, shape, bias=None):
        if kernels.groupwise_supported(self.bits, self.group_size, self.symmetric) and kernels.use_kernels(x):
            from quant.kernels.groupwise import groupwise_linear

            return groupwise_linear(x, parts, shape, bias, bits=self.bits, group_size=self.group_size)
        return super().linear(x, parts, shape, bias)


register_format("none", NoQuant)
register_format("int8", lambda: GroupwiseInt(8, group_size=64, symmetric=True))
register_format("int4", lambda: GroupwiseInt(4, group_size=64))
register_format("int3", lambda: GroupwiseInt(3, group_size=64, clip_search=True))
register_format("int2", lambda: GroupwiseInt(2, group_size=32, clip_search=True))
register_format("nf4", NF4)
