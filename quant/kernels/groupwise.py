"""Triton kernels for the groupwise ``int4`` and ``int8`` layouts of :mod:`quant.formats`.

Imported only when :func:`quant.kernels.use_kernels` said yes (CUDA tensor, triton
present); the plain-torch reference is ``GroupwiseInt.dequantize`` + ``F.linear``.

Shape key: T = tokens, N = out features, K = in features, Kp = K padded to a multiple of
the group, G = Kp / group.

* int4: ``q`` uint8 ``[N, Kp/2]``, column ``2j`` in the low nibble of byte ``j`` and
  ``2j + 1`` in the high nibble; ``scale``, ``zero`` fp16 ``[N, G]``; ``w = q * scale + zero``.
* int8: ``q`` int8 ``[N, Kp]``; ``scale`` fp16 ``[N, G]``; ``w = q * scale``.

Two kernels per layout:

* ``gemv`` (decode, T <= 8): program ``(n, s)`` owns ``BLOCK_N`` output rows and the
  groups of split ``s``. Each step takes one group: it loads the ``[BLOCK_N, group]``
  codes once (a packed int4 byte holds two columns; the even columns of x meet the low
  nibbles, the odd ones the high nibbles), with one scale (and zero) per row,
  dequantizes in registers (fp32) and multiplies with every token's slice of x. With
  one split the program adds the bias and writes ``out [T, N]``; with several (split-K,
  for matrices with few output rows) it writes fp32 partial sums ``[S, T, N]`` and the
  caller adds them up.
* ``dequant`` (prefill): writes ``W [N, K]`` in x's dtype, then one ``F.linear``.

Masks: rows ``>= N`` are never loaded or stored; x is read as zero at columns ``>= K``
(the padded columns' codes dequantize to ``zero``, not to 0, so this mask is what keeps
them out of the sum); tokens past T are never stored.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from quant.kernels import DECODE_MAX_TOKENS


# -- kernels ---------------------------------------------------------------------------
@triton.jit
def _int4_gemv_kernel(
    x_ptr, q_ptr, scale_ptr, zero_ptr, bias_ptr, out_ptr,
    T, N, K, G, groups_per_split,
    stride_xt, stride_qn, stride_sn, stride_os, stride_ot,
    GROUP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    toks = tl.arange(0, BLOCK_T)  # [BT]
    j = tl.arange(0, GROUP // 2)  # [g/2] packed byte within a group
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)

    g_begin = pid_s * groups_per_split
    g_end = tl.minimum(g_begin + groups_per_split, G)
    for g in range(g_begin, g_end):  # one group of GROUP columns per step
        k_lo = g * GROUP + 2 * j  # [g/2] column held by the low nibble; k_lo + 1 by the high one
        b = tl.load(q_ptr + rows64[:, None] * stride_qn + (k_lo // 2)[None, :], mask=row_ok[:, None], other=0)
        b = b.to(tl.int32)  # [BN, g/2]
        s = tl.load(scale_ptr + rows64 * stride_sn + g, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        z = tl.load(zero_ptr + rows64 * stride_sn + g, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        w_lo = (b & 0xF).to(tl.float32) * s + z  # [BN, g/2]
        w_hi = (b >> 4).to(tl.float32) * s + z  # [BN, g/2]
        for t in tl.static_range(BLOCK_T):
            x_t = x_ptr + tl.minimum(t, T - 1) * stride_xt  # rows past T repeat row T-1, never stored
            x_lo = tl.load(x_t + k_lo, mask=k_lo < K, other=0.0).to(tl.float32)  # [g/2]
            x_hi = tl.load(x_t + k_lo + 1, mask=k_lo + 1 < K, other=0.0).to(tl.float32)
            dot = tl.sum(w_lo * x_lo[None, :] + w_hi * x_hi[None, :], axis=1)  # [BN]
            acc += tl.where(toks[:, None] == t, dot[None, :], 0.0)  # row t of [BT, BN]

    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + pid_s * stride_os + toks[:, None] * stride_ot + rows[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(toks < T)[:, None] & row_ok[None, :])


@triton.jit
def _int8_gemv_kernel(
    x_ptr, q_ptr, scale_ptr, bias_ptr, out_ptr,
    T, N, K, G, groups_per_split,
    stride_xt, stride_qn, stride_sn, stride_os, stride_ot,
    GROUP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    toks = tl.arange(0, BLOCK_T)  # [BT]
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)

    g_begin = pid_s * groups_per_split
    g_end = tl.minimum(g_begin + groups_per_split, G)
    for g in range(g_begin, g_end):  # one group of GROUP columns per step
        k = g * GROUP + tl.arange(0, GROUP)  # [g]
        q = tl.load(q_ptr + rows64[:, None] * stride_qn + k[None, :], mask=row_ok[:, None], other=0)
        s = tl.load(scale_ptr + rows64 * stride_sn + g, mask=row_ok, other=0.0).to(tl.float32)
        w = q.to(tl.float32) * s[:, None]  # [BN, g]
        for t in tl.static_range(BLOCK_T):
            x_t = x_ptr + tl.minimum(t, T - 1) * stride_xt  # rows past T repeat row T-1, never stored
            x_t = tl.load(x_t + k, mask=k < K, other=0.0).to(tl.float32)  # [g]
            dot = tl.sum(w * x_t[None, :], axis=1)  # [BN]
            acc += tl.where(toks[:, None] == t, dot[None, :], 0.0)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + pid_s * stride_os + toks[:, None] * stride_ot + rows[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(toks < T)[:, None] & row_ok[None, :])


@triton.jit
def _int4_dequant_kernel(
    q_ptr, scale_ptr, zero_ptr, w_ptr,
    N, K, stride_qn, stride_sn, stride_wn,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    HALF: tl.constexpr = BLOCK_K // 2
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    k_lo = tl.program_id(1) * BLOCK_K + 2 * tl.arange(0, HALF)  # [HALF]
    lo_ok = row_ok[:, None] & (k_lo < K)[None, :]  # [BN, HALF]
    hi_ok = row_ok[:, None] & (k_lo + 1 < K)[None, :]
    b = tl.load(q_ptr + rows64[:, None] * stride_qn + (k_lo // 2)[None, :], mask=lo_ok, other=0)
    b = b.to(tl.int32)
    g = (k_lo // GROUP)[None, :]
    s = tl.load(scale_ptr + rows64[:, None] * stride_sn + g, mask=lo_ok, other=0.0).to(tl.float32)
    z = tl.load(zero_ptr + rows64[:, None] * stride_sn + g, mask=lo_ok, other=0.0).to(tl.float32)
    w_row = w_ptr + rows64[:, None] * stride_wn
    out_ty = w_ptr.dtype.element_ty
    tl.store(w_row + k_lo[None, :], ((b & 0xF).to(tl.float32) * s + z).to(out_ty), mask=lo_ok)
    tl.store(w_row + (k_lo + 1)[None, :], ((b >> 4).to(tl.float32) * s + z).to(out_ty), mask=hi_ok)


@triton.jit
def _int8_dequant_kernel(
    q_ptr, scale_ptr, w_ptr,
    N, K, stride_qn, stride_sn, stride_wn,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)  # [BK]
    ok = row_ok[:, None] & (k < K)[None, :]  # [BN, BK]
    q = tl.load(q_ptr + rows64[:, None] * stride_qn + k[None, :], mask=ok, other=0).to(tl.float32)
    s = tl.load(scale_ptr + rows64[:, None] * stride_sn + (k // GROUP)[None, :], mask=ok, other=0.0)
    w = q * s.to(tl.float32)
    tl.store(w_ptr + rows64[:, None] * stride_wn + k[None, :], w.to(w_ptr.dtype.element_ty), mask=ok)


# -- launchers -------------------------------------------------------------------------
# (BLOCK_N, num_warps) per code width: 1 KiB of codes per step, 72-96 registers a thread on
# sm_90 (python -m quant.kernels.aot_check; 64 rows of int4 took 187). Not tuned on a GPU
# yet: ``python -m quant.kernels.bench --sweep`` times the alternatives.
GEMV_CONFIG = {4: (32, 4), 8: (16, 4)}
DEQUANT_BLOCK_N, DEQUANT_BLOCK_K, DEQUANT_WARPS = 32, 128, 4
MIN_GROUPS_PER_SPLIT = 8  # each split-K program streams at least this many groups


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":  # Triton's interpreter on the CPU (tests)
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def _split_k(n_blocks: int, groups: int, device: torch.device) -> int:
    """How many K-splits give about 4 programs per SM, keeping each split long enough."""
    want = max(1, 4 * _num_sms(device) // n_blocks)
    return max(1, min(want, groups // MIN_GROUPS_PER_SPLIT))


def _row_major(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def split_k_output(
    x: torch.Tensor, n_blocks: int, groups: int, n_out: int, split_k: int | None
) -> tuple[torch.Tensor, int]:
    """The output a GEMV over ``groups`` groups writes, and the groups of each K-split: with
    one split ``[1, T, N]`` in x's dtype (the kernel adds the bias), with several fp32
    partial sums ``[S, T, N]`` (no bias; :func:`split_k_result` adds them up)."""
    splits = split_k or _split_k(n_blocks, groups, x.device)
    groups_per_split = triton.cdiv(groups, splits)
    splits = triton.cdiv(groups, groups_per_split)  # no empty splits
    dtype = x.dtype if splits == 1 else torch.float32
    return torch.empty((splits, x.shape[0], n_out), dtype=dtype, device=x.device), groups_per_split


def split_k_result(out: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``[T, N]`` from :func:`split_k_output`'s tensor once the kernel wrote it."""
    if out.shape[0] == 1:
        return out[0]
    y = out.sum(dim=0)  # [T, N] fp32
    if bias is not None:
        y += bias
    return y.to(dtype)


def decode_or_prefill(x: torch.Tensor, n_out: int, n_in: int, gemv_fn, dequant_fn, bias) -> torch.Tensor:
    """``x [..., K] -> [..., N]``: ``gemv_fn(x2)`` for up to 8 rows, else ``F.linear(x2,
    dequant_fn(dtype), bias)``."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, n_in)  # [T, K]
    if x2.shape[0] == 0:
        return x.new_empty((*lead, n_out))
    decode = x2.shape[0] <= DECODE_MAX_TOKENS  # the GEMV adds the bias itself
    y = gemv_fn(x2) if decode else F.linear(x2, dequant_fn(x.dtype), bias)  # [T, N]
    return y.reshape(*lead, n_out)


def gemv(
    x: torch.Tensor,
    parts: dict[str, torch.Tensor],
    shape: tuple[int, int],
    bias: torch.Tensor | None,
    *,
    bits: int,
    group_size: int,
    split_k: int | None = None,
    config: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Fused dequantize + ``x @ W.T (+ bias)`` for ``x [T, K]``, ``T <= 8``; returns ``[T, N]``.

    ``split_k`` and ``config`` (``(BLOCK_N, num_warps)``) override the defaults, for tests
    and the benchmark's sweep.
    """
    N, K = shape
    T = x.shape[0]
    if bits not in GEMV_CONFIG:
        raise ValueError(f"no gemv kernel for {bits}-bit codes")
    if not 1 <= T <= DECODE_MAX_TOKENS:
        raise ValueError(f"gemv takes 1 to {DECODE_MAX_TOKENS} tokens, got {T}")
    x = _row_major(x)
    q, scale = _row_major(parts["q"]), _row_major(parts["scale"])
    G = scale.shape[1]  # groups per row: K padded to the group, / group
    block_n, num_warps = config or GEMV_CONFIG[bits]
    block_t = triton.next_power_of_2(T)
    n_blocks = triton.cdiv(N, block_n)
    out, groups_per_split = split_k_output(x, n_blocks, G, N, split_k)
    has_bias = bias is not None and out.shape[0] == 1  # one split: the kernel adds the bias
    b = bias if has_bias else out  # never read without HAS_BIAS
    grid = (n_blocks, out.shape[0])
    common = dict(
        T=T, N=N, K=K, G=G, groups_per_split=groups_per_split,
        stride_xt=x.stride(0), stride_qn=q.stride(0), stride_sn=scale.stride(0),
        stride_os=out.stride(0), stride_ot=out.stride(1),
        GROUP=group_size, BLOCK_T=block_t, BLOCK_N=block_n, HAS_BIAS=has_bias, num_warps=num_warps,
    )  # fmt: skip
    if bits == 4:
        zero = _row_major(parts["zero"])
        _int4_gemv_kernel[grid](x, q, scale, zero, b, out, **common)
    else:
        _int8_gemv_kernel[grid](x, q, scale, b, out, **common)
    return split_k_result(out, bias, x.dtype)


def dequantize(
    parts: dict[str, torch.Tensor], shape: tuple[int, int], dtype: torch.dtype, *, bits: int, group_size: int
) -> torch.Tensor:
    """``W [N, K]`` in ``dtype``, on the parts' device: the kernel twin of ``GroupwiseInt.dequantize``."""
    N, K = shape
    q, scale = _row_major(parts["q"]), _row_major(parts["scale"])
    w = torch.empty((N, K), dtype=dtype, device=q.device)
    grid = (triton.cdiv(N, DEQUANT_BLOCK_N), triton.cdiv(K, DEQUANT_BLOCK_K))
    common = dict(
        N=N, K=K, stride_qn=q.stride(0), stride_sn=scale.stride(0), stride_wn=w.stride(0),
        GROUP=group_size, BLOCK_N=DEQUANT_BLOCK_N, BLOCK_K=DEQUANT_BLOCK_K, num_warps=DEQUANT_WARPS,
    )  # fmt: skip
    if bits == 4:
        _int4_dequant_kernel[grid](q, scale, _row_major(parts["zero"]), w, **common)
    elif bits == 8:
        _int8_dequant_kernel[grid](q, scale, w, **common)
    else:
        raise ValueError(f"no dequantize kernel for {bits}-bit codes")
    return w


def groupwise_linear(
    x: torch.Tensor,
    parts: dict[str, torch.Tensor],
    shape: tuple[int, int],
    bias: torch.Tensor | None,
    *,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """``x [..., K] -> [..., N]``: fused GEMV for up to 8 rows of x, else dequantize + GEMM."""
    return decode_or_prefill(
        x, shape[0], shape[1],
        lambda x2: gemv(x2, parts, shape, bias, bits=bits, group_size=group_size),
        lambda dtype: dequantize(parts, shape, dtype, bits=bits, group_size=group_size), bias,
    )  # fmt: skip
