"""Offline: choose each group's clipping range by squared error, for low-bit formats.

Min-max scaling spends the few levels of a 2- or 3-bit code on the tails of each group.
Shrinking the range ``[lo, hi]`` to ``[a * lo, a * hi]`` for a shrink factor ``a < 1``
clips a few outliers and gives every other weight a finer step. For each group we try a
fixed list of factors and keep the one whose rounded weights are closest to the originals
in squared error (the clip-ratio search of AWQ, arXiv 2306.00978, applied per group to
an asymmetric code). It is deterministic, costs one quantize pass per candidate, and
changes only the chosen scale and zero values: the stored layout stays the same.

Measured on N(0, 1) weights (``[512, 4096]``): int2 (group 32) 39.3% -> 31.4% relative
Frobenius error, int3 (group 64) 19.2% -> 17.4%.
"""

from __future__ import annotations

import torch

# plain min-max, then 10% narrower each step: 11 steps of 5% gain about 0.1 point
SHRINKS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
CHUNK = 1 << 18  # weights per row chunk: every candidate pass over a chunk stays in cache


def search_clip_range(
    w: torch.Tensor, bits: int, shrinks: tuple[float, ...] = SHRINKS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per group of ``w [O, G, g]`` (float32), the shrink factor with least squared error.

    Returns ``(codes uint8 [O, G, g], scale fp16 [O, G], zero fp16 [O, G])``, scale and
    zero rounded to fp16 before the codes are chosen, so ``codes * scale + zero`` is the
    reconstruction whose error was measured. Ties keep the earlier (wider) candidate, so
    with ``shrinks[0] = 1.0`` no group does worse than min-max.
    """
    n_out, G, g = w.shape
    codes = torch.empty(w.shape, dtype=torch.uint8, device=w.device)
    scale = torch.empty((n_out, G), dtype=torch.float16, device=w.device)
    zero = torch.empty_like(scale)
    rows = max(1, CHUNK // (G * g))
    for r in range(0, n_out, rows):
        sl = slice(r, r + rows)
        scale[sl], zero[sl] = _best_range(w[sl], bits, shrinks)
        codes[sl] = _codes(w[sl], scale[sl], zero[sl], bits).to(torch.uint8)
    return codes, scale, zero


def _best_range(w: torch.Tensor, bits: int, shrinks: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 ``(scale, zero) [o, G]`` of the candidate range with least squared error on ``w [o, G, g]``."""
    qmax = 2**bits - 1
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)  # [o, G]
    buf = torch.empty_like(w)
    best_err = best_scale = best_zero = None
    for a in shrinks:
        scale, zero = ((hi - lo) * (a / qmax)).half(), (lo * a).half()  # [o, G]
        s, z = scale.float().unsqueeze(-1), zero.float().unsqueeze(-1)
        inv = torch.where(s > 0, 1.0 / s, 0.0)  # constant groups: scale 0, codes 0, w = zero
        torch.sub(w, z, out=buf).mul_(inv).round_().clamp_(0, qmax)  # codes
        err = buf.mul_(s).add_(z).sub_(w).square_().sum(dim=-1)  # [o, G]
        if best_err is None:
            best_err, best_scale, best_zero = err, scale, zero
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def _codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Nearest codes (float) of ``w [o, G, g]`` for ``scale``/``zero [o, G]``, as measured above."""
    s, z = scale.float().unsqueeze(-1), zero.float().unsqueeze(-1)
    inv = torch.where(s > 0, 1.0 / s, 0.0)
    return ((w - z) * inv).round_().clamp_(0, 2**bits - 1)
