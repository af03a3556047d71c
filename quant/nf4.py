"""``nf4``: bitsandbytes' 4-bit NormalFloat (QLoRA, arXiv 2305.14314), blocks of 64.

Each weight is ``code[i] * absmax`` of its block, with ``code`` the 16 quantiles of a
normal distribution scaled to [-1, 1]. The layout is bitsandbytes' own, unchanged, so its
CUDA kernels read our parts directly: the weight ``[N, K]`` is flattened row-major
(``n = N * K`` values) and cut into blocks of 64 consecutive values (a block may span two
rows when K is not a multiple of 64):

* ``q`` uint8 ``[(n + 1) // 2, 1]``: value ``2i`` in the *high* nibble of byte ``i``,
  ``2i + 1`` in the low nibble;
* ``absmax`` float32 ``[ceil(n / 64)]``: the largest magnitude in each block.

4.5 bits per weight, like ``int4``. Quantizing calls ``bitsandbytes.functional.quantize_4bit``
(it runs on the CPU too); :meth:`NF4.dequantize` is a plain-torch reference that the tests
check equals ``bitsandbytes.functional.dequantize_4bit``. On CUDA, :meth:`NF4.linear` uses
bitsandbytes' kernels: ``bnb.matmul_4bit`` for up to 8 tokens, ``dequantize_4bit`` + one
GEMM beyond. bitsandbytes is imported only there (its import takes seconds).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from quant.base import Part, QuantFormat
from quant.kernels import DECODE_MAX_TOKENS, kernels_enabled

BLOCK = 64

# bitsandbytes.functional.get_4bit_type("nf4"): quantiles of N(0, 1), normalized to [-1, 1]
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip


@functools.cache
def nf4_code(device: torch.device) -> torch.Tensor:
    """The 16 NF4 values, float32, on ``device`` (cached: no copy per call)."""
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


class NF4(QuantFormat):
    """bitsandbytes NF4, blocksize 64, absmax in float32 (no nested statistics)."""

    name = "nf4"
    description = "bitsandbytes 4-bit NormalFloat, blocks of 64"

    def params(self):
        return {"blocksize": BLOCK, "quant_type": "nf4"}

    def parts(self, shape, dtype):
        n = shape[0] * shape[1]
        return [
            Part("q", ((n + 1) // 2, 1), torch.uint8),
            Part("absmax", (math.ceil(n / BLOCK),), torch.float32),
        ]

    def quantize(self, weight):
        import bitsandbytes.functional as bnbf

        q, state = bnbf.quantize_4bit(
            weight.float().contiguous(), blocksize=BLOCK, compress_statistics=False, quant_type="nf4"
        )
        return {"q": q, "absmax": state.absmax.float()}

    def dequantize(self, parts, shape, dtype):
        out, n_in = shape
        n = out * n_in
        q = parts["q"].reshape(-1)  # [(n+1)/2]
        idx = torch.stack([q >> 4, q & 0xF], dim=-1).reshape(-1)[:n]  # [n], high nibble first
        w = nf4_code(q.device)[idx.long()]  # [n] in [-1, 1]
        n_blocks = parts["absmax"].shape[0]
        w = F.pad(w, (0, n_blocks * BLOCK - n)).reshape(n_blocks, BLOCK)  # [B, 64]
        w = w * parts["absmax"].float().unsqueeze(-1)
        return w.reshape(-1)[:n].reshape(out, n_in).to(dtype)

    def row_block(self, parts, shape, start, stop):
        """Rows of the flat layout: whole blocks of 64 (and bytes) only when a row is."""
        n_in = shape[1]
        if n_in % BLOCK:
            return None
        return {"q": parts["q"][start * n_in // 2 : stop * n_in // 2],
                "absmax": parts["absmax"][start * n_in // BLOCK : stop * n_in // BLOCK]}  # fmt: skip

    def linear(self, x, parts, shape, bias=None):
        if not x.is_cuda or not kernels_enabled():
            return super().linear(x, parts, shape, bias)
        lead = x.shape[:-1]
        return self.bnb_linear(x.reshape(-1, shape[1]), parts, shape, bias).reshape(*lead, shape[0])

    def bnb_linear(self, x2, parts, shape, bias=None):
        """``x2 [T, K]`` through bitsandbytes' kernels (the CUDA path; its CPU backend runs it too)."""
        import bitsandbytes as bnb

        state = self.quant_state(parts, shape, x2.dtype)
        if x2.shape[0] <= DECODE_MAX_TOKENS:
            # as Linear4bit calls it (weight.t()): the form every bitsandbytes >= 0.45 accepts
            return bnb.matmul_4bit(x2, parts["q"].t(), state, bias=bias)  # [T, N]
        w = bnb.functional.dequantize_4bit(parts["q"], state)  # [N, K] in x's dtype
        return F.linear(x2, w, bias)

    @staticmethod
    def quant_state(parts: dict[str, torch.Tensor], shape: tuple[int, int], dtype: torch.dtype):
        """bitsandbytes' ``QuantState`` for our parts (no copy), producing ``dtype``."""
        from bitsandbytes.functional import QuantState

        return QuantState(
            absmax=parts["absmax"], shape=torch.Size(shape), code=nf4_code(parts["absmax"].device),
            blocksize=BLOCK, quant_type="nf4", dtype=dtype,
        )  # fmt: skip
