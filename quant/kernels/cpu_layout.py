"""Triton kernels for int4 in torch's CPU layout (``int4-cpu``, :mod:`quant.cpu_int4`), on CUDA.

With ``--host-misses`` beside a GPU, one host store serves two readers: the CPU computes
a miss from it with torch's CPU int4 kernel, and the GPU copies experts from it into its
cache. That store is in torch's CPU layout (a second, GPU-layout copy would double the
host memory), so the GPU reads that layout too, with these kernels; the plain-torch
reference is ``Int4CpuPacked.dequantize`` + ``F.linear``.

The layout (shape key: T = tokens, N = out features, K = in features, both multiples of
64; B = rows per block, 64 or 32, by how torch packed on the host's CPU):

* ``q`` uint8 ``[N, K/2]``, read as ``[N/B, K, B/2]``: per block of B output rows, per
  column k, ``B/2`` bytes, byte j holding two rows' codes (low nibble, high nibble):
  rows ``j`` and ``j + B/2`` ("halves") or ``2j`` and ``2j + 1`` ("adjacent");
* ``sz`` bfloat16 ``[K/64, N, 2]``: each group's ``(scale, zero)``, ``w = (q - 8) * scale + zero``.

Two kernels, as for the GPU's own int4 (:mod:`quant.kernels.groupwise`):

* ``gemv`` (decode, T <= 8): program ``(b, s)`` owns row block ``b`` and the groups of
  split ``s``. Each step loads one group's ``[64, B/2]`` bytes (2 KiB for B = 64, one
  contiguous run: this layout is column-major within a block), dequantizes the low and
  the high nibbles' rows in fp32 registers and reduces each against every token's 64
  columns of x, so the codes are read once for all tokens. One split: the program adds
  the bias and writes ``out [T, N]`` in x's dtype; several (split-K, for few row blocks):
  fp32 partial sums ``[S, T, N]`` that the caller adds up.
* ``dequant`` (prefill): program ``(b, g)`` writes the ``[B, 64]`` tile of ``W [N, K]``
  in x's dtype, then one ``F.linear``.

No masks on rows or columns: both dimensions are whole blocks and groups
(``quant.cpu_int4.fits``); tokens past T re-read row T-1 and are never stored.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quant.kernels import DECODE_MAX_TOKENS
from quant.kernels.groupwise import _row_major, decode_or_prefill, split_k_output, split_k_result

GROUP = 64
GEMV_WARPS = 4
DEQUANT_WARPS = 4


@triton.jit
def _rows(block_start, j, HALF: tl.constexpr, HALVES: tl.constexpr):
    """The rows whose codes byte ``j`` of a block holds, in its low and its high nibble."""
    if HALVES:
        return block_start + j, block_start + HALF + j
    return block_start + 2 * j, block_start + 2 * j + 1


@triton.jit
def _gemv_kernel(
    x_ptr, q_ptr, sz_ptr, bias_ptr, out_ptr,
    T, N, K, groups_per_split,
    stride_xt, stride_os, stride_ot,
    BLOCK: tl.constexpr, HALVES: tl.constexpr, BLOCK_T: tl.constexpr, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    HALF: tl.constexpr = BLOCK // 2
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    j = tl.arange(0, HALF)  # [B/2] byte within a block's column
    rows_lo, rows_hi = _rows(pid_b * BLOCK, j, HALF, HALVES)  # [B/2] each
    cols = tl.arange(0, 64)  # [64] column within a group
    toks = tl.arange(0, BLOCK_T)  # [BT]
    block_q = q_ptr + pid_b.to(tl.int64) * K * HALF  # the block's [K, B/2] bytes
    acc_lo = tl.zeros((BLOCK_T, HALF), dtype=tl.float32)
    acc_hi = tl.zeros((BLOCK_T, HALF), dtype=tl.float32)

    G = K // 64
    g_begin = pid_s * groups_per_split
    g_end = tl.minimum(g_begin + groups_per_split, G)
    for g in range(g_begin, g_end):  # one group of 64 columns per step
        k = g * 64 + cols  # [64]
        b = tl.load(block_q + k[:, None] * HALF + j[None, :]).to(tl.int32)  # [64, B/2]
        sz_g = sz_ptr + g * N * 2  # int32 offsets: N * K < 2^31 for any MoE expert
        s_lo = tl.load(sz_g + rows_lo * 2).to(tl.float32)  # [B/2]
        s_hi = tl.load(sz_g + rows_hi * 2).to(tl.float32)
        z_lo = tl.load(sz_g + rows_lo * 2 + 1).to(tl.float32) - 8.0 * s_lo  # w = q * scale + (zero - 8 scale)
        z_hi = tl.load(sz_g + rows_hi * 2 + 1).to(tl.float32) - 8.0 * s_hi
        w_lo = (b & 0xF).to(tl.float32) * s_lo[None, :] + z_lo[None, :]  # [64, B/2]
        w_hi = (b >> 4).to(tl.float32) * s_hi[None, :] + z_hi[None, :]
        for t in tl.static_range(BLOCK_T):
            x_t = tl.load(x_ptr + tl.minimum(t, T - 1) * stride_xt + k).to(tl.float32)  # [64]
            dot_lo = tl.sum(w_lo * x_t[:, None], axis=0)  # [B/2]
            dot_hi = tl.sum(w_hi * x_t[:, None], axis=0)
            acc_lo += tl.where(toks[:, None] == t, dot_lo[None, :], 0.0)  # row t of [BT, B/2]
            acc_hi += tl.where(toks[:, None] == t, dot_hi[None, :], 0.0)

    if HAS_BIAS:
        acc_lo += tl.load(bias_ptr + rows_lo).to(tl.float32)[None, :]
        acc_hi += tl.load(bias_ptr + rows_hi).to(tl.float32)[None, :]
    out = out_ptr + pid_s * stride_os + toks[:, None] * stride_ot
    t_ok = (toks < T)[:, None]
    out_ty = out_ptr.dtype.element_ty
    tl.store(out + rows_lo[None, :], acc_lo.to(out_ty), mask=t_ok)
    tl.store(out + rows_hi[None, :], acc_hi.to(out_ty), mask=t_ok)


@triton.jit
def _dequant_kernel(
    q_ptr, sz_ptr, w_ptr, N, K, stride_wn,
    BLOCK: tl.constexpr, HALVES: tl.constexpr,
):  # fmt: skip
    HALF: tl.constexpr = BLOCK // 2
    pid_b = tl.program_id(0)
    g = tl.program_id(1)
    j = tl.arange(0, HALF)
    rows_lo, rows_hi = _rows(pid_b * BLOCK, j, HALF, HALVES)  # [B/2]
    k = g * 64 + tl.arange(0, 64)  # [64]
    b = tl.load(q_ptr + pid_b.to(tl.int64) * K * HALF + k[:, None] * HALF + j[None, :]).to(tl.int32)
    sz_g = sz_ptr + g.to(tl.int64) * N * 2
    s_lo = tl.load(sz_g + rows_lo * 2).to(tl.float32)
    s_hi = tl.load(sz_g + rows_hi * 2).to(tl.float32)
    z_lo = tl.load(sz_g + rows_lo * 2 + 1).to(tl.float32) - 8.0 * s_lo
    z_hi = tl.load(sz_g + rows_hi * 2 + 1).to(tl.float32) - 8.0 * s_hi
    w_lo = tl.trans((b & 0xF).to(tl.float32) * s_lo[None, :] + z_lo[None, :])  # [B/2, 64]
    w_hi = tl.trans((b >> 4).to(tl.float32) * s_hi[None, :] + z_hi[None, :])
    out_ty = w_ptr.dtype.element_ty
    tl.store(w_ptr + rows_lo.to(tl.int64)[:, None] * stride_wn + k[None, :], w_lo.to(out_ty))
    tl.store(w_ptr + rows_hi.to(tl.int64)[:, None] * stride_wn + k[None, :], w_hi.to(out_ty))


def _check(parts: dict[str, torch.Tensor], shape: tuple[int, int], block: int) -> None:
    N, K = shape
    if N % max(block, 64) or K % GROUP:
        raise ValueError(f"int4-cpu kernels need N and K multiples of 64, not {shape}")
    if tuple(parts["q"].shape) != (N, K // 2) or tuple(parts["sz"].shape) != (K // GROUP, N, 2):
        raise ValueError(f"int4-cpu parts do not match the shape {shape}")


def gemv(
    x: torch.Tensor,
    parts: dict[str, torch.Tensor],
    shape: tuple[int, int],
    bias: torch.Tensor | None,
    *,
    block: int,
    halves: bool,
    split_k: int | None = None,
) -> torch.Tensor:
    """Fused dequantize + ``x @ W.T (+ bias)`` for ``x [T, K]``, ``T <= 8``; returns ``[T, N]``."""
    N, K = shape
    T = x.shape[0]
    if not 1 <= T <= DECODE_MAX_TOKENS:
        raise ValueError(f"gemv takes 1 to {DECODE_MAX_TOKENS} tokens, got {T}")
    _check(parts, shape, block)
    x = _row_major(x)
    # the layout has no strides of its own: a view that is not contiguous would be misread
    q, sz = parts["q"].contiguous(), parts["sz"].contiguous()
    n_blocks = N // block
    out, groups_per_split = split_k_output(x, n_blocks, K // GROUP, N, split_k)
    has_bias = bias is not None and out.shape[0] == 1  # one split: the kernel adds the bias
    _gemv_kernel[(n_blocks, out.shape[0])](
        x, q, sz, bias if has_bias else out, out, T, N, K, groups_per_split,
        x.stride(0), out.stride(0), out.stride(1),
        BLOCK=block, HALVES=halves, BLOCK_T=triton.next_power_of_2(T), HAS_BIAS=has_bias,
        num_warps=GEMV_WARPS,
    )  # fmt: skip
    return split_k_result(out, bias, x.dtype)


def dequantize(
    parts: dict[str, torch.Tensor], shape: tuple[int, int], dtype: torch.dtype, *, block: int, halves: bool
) -> torch.Tensor:
    """``W [N, K]`` in ``dtype`` on the parts' device: the kernel twin of ``Int4CpuPacked.dequantize``."""
    N, K = shape
    _check(parts, shape, block)
    q, sz = parts["q"].contiguous(), parts["sz"].contiguous()
    w = torch.empty((N, K), dtype=dtype, device=q.device)
    _dequant_kernel[(N // block, K // GROUP)](
        q, sz, w, N, K, w.stride(0), BLOCK=block, HALVES=halves, num_warps=DEQUANT_WARPS
    )
    return w


def linear(
    x: torch.Tensor,
    parts: dict[str, torch.Tensor],
    shape: tuple[int, int],
    bias: torch.Tensor | None,
    *,
    block: int,
    halves: bool,
) -> torch.Tensor:
    """``x [..., K] -> [..., N]``: fused GEMV for up to 8 rows of x, else dequantize + GEMM."""
    return decode_or_prefill(
        x, shape[0], shape[1],
        lambda x2: gemv(x2, parts, shape, bias, block=block, halves=halves),
        lambda dtype: dequantize(parts, shape, dtype, block=block, halves=halves), bias,
    )  # fmt: skip
