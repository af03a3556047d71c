"""int2/int3 choose each group's range by squared error: tighter bounds, same layout."""

from __future__ import annotations

import pytest
import torch

from quant import get_format
from quant.clip_search import search_clip_range

# relative Frobenius error on N(0, 1) weights, the shapes of test_quant.py. BOUNDS hold for
# any seed (worst of 200 seeds on [8, 64]: int2 34.1%, int3 19.4%); on [256, 512] the error
# is steady (int2 31.4%, int3 17.4%; min-max gave 39.3% and 19.2%), so TIGHT is checked there.
BOUNDS = {"int2": 0.36, "int3": 0.20}
TIGHT = {"int2": 0.32, "int3": 0.18}
SHAPES = [(256, 512), (96, 200), (8, 64)]


def _w(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(BOUNDS))
@pytest.mark.parametrize("shape", SHAPES)
def test_tighter_error_bound(name, shape):
    fmt = get_format(name)
    w = _w(shape, seed=shape[1])
    err = ((fmt.dequantize(fmt.quantize(w), shape, torch.float32) - w).norm() / w.norm()).item()
    assert err <= (TIGHT if shape == SHAPES[0] else BOUNDS)[name]


@pytest.mark.parametrize("bits", [2, 3])
def test_no_group_worse_than_minmax(bits):
    w = _w((64, 16, 32), seed=bits)  # [O, G, g]

    def group_err(q, scale, zero):
        return (q.float() * scale.float()[..., None] + zero.float()[..., None] - w).square().sum(-1)

    err = group_err(*search_clip_range(w, bits))
    err0 = group_err(*search_clip_range(w, bits, shrinks=(1.0,)))  # plain min-max
    assert (err <= err0).all()
    assert err.sum() < 0.9 * err0.sum()


def test_deterministic_and_codes_in_range():
    w = _w((32, 8, 32), seed=5)
    a, b = search_clip_range(w, 2), search_clip_range(w.clone(), 2)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert int(a[0].max()) <= 3 and a[1].dtype == a[2].dtype == torch.float16


def test_constant_and_zero_groups_are_exact():
    fmt = get_format("int2")
    w = torch.zeros(4, 64)
    w[1] = 3.0  # constant rows: scale 0, every code 0, w = zero
    w[2, :5] = 1.0
    w_hat = fmt.dequantize(fmt.quantize(w), (4, 64), torch.float32)
    assert torch.isfinite(w_hat).all()
    torch.testing.assert_close(w_hat[[0, 1, 3]], w[[0, 1, 3]])
