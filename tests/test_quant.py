"""Quantization formats: declared parts, packing, and error bounds on random Gaussian weights."""

from __future__ import annotations

import pytest
import torch

from quant import available_formats, get_format
from quant.packing import pack, unpack, unpack_float
from runtime.errors import UnknownNameError

# relative Frobenius error bounds on N(0, 1) weights, any seed (measured on [256, 512]: int8 0.6%,
# int4 9%, nf4 9.2%, int3 17.4%, int2 31.4%; worst of 200 seeds on [8, 64]: int3 19.4%, int2 34.1%)
BOUNDS = {"none": 0.0, "int8": 0.01, "int4": 0.12, "nf4": 0.11, "int3": 0.20, "int2": 0.36}
SHAPES = [(256, 512), (96, 200), (8, 64)]  # 200: not a multiple of the group size


def rel_err(fmt, w):
    parts = fmt.quantize(w)
    w_hat = fmt.dequantize(parts, tuple(w.shape), torch.float32)
    return ((w_hat - w).norm() / w.norm()).item(), parts


@pytest.mark.parametrize("name", list(BOUNDS))
@pytest.mark.parametrize("shape", SHAPES)
def test_error_bound_and_declared_parts(name, shape):
    fmt = get_format(name)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(hash((name, shape)) % 2**31))
    err, parts = rel_err(fmt, w)
    assert err <= BOUNDS[name], err
    declared = {p.name: (p.shape, p.dtype) for p in fmt.parts(shape, w.dtype)}
    assert {k: (tuple(v.shape), v.dtype) for k, v in parts.items()} == declared
    assert fmt.nbytes(shape, w.dtype) == sum(v.numel() * v.element_size() for v in parts.values())


def test_fewer_bits_store_fewer_bytes():
    sizes = [
        get_format(n).nbytes((512, 512), torch.bfloat16) for n in ("none", "int8", "int4", "int3", "int2")
    ]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)
    assert get_format("int4").bits_per_weight((512, 512), torch.bfloat16) == pytest.approx(4.5)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_round_trip(bits):
    q = torch.randint(0, 2**bits, (7, 64), dtype=torch.uint8)
    p = pack(q, bits)
    assert p.shape == (7, 64 * bits // 8)
    assert torch.equal(unpack(p, bits, 64), q)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_unpack_float_equals_unpack(bits):
    """The word-at-a-time unpacking gives unpack's values exactly: on rows of several widths,
    in two dtypes, and on a row that starts off a 4-byte boundary (the plain path)."""
    gen = torch.Generator().manual_seed(bits)
    for shape in [(3, 64), (5, 32), (2, 3, 128)]:
        q = torch.randint(0, 2**bits, shape, generator=gen, dtype=torch.uint8)
        p = pack(q, bits)
        for dtype in (torch.float32, torch.bfloat16):
            got = unpack_float(p, bits, shape[-1], dtype)
            assert got.dtype == dtype and torch.equal(got, q.to(dtype))
    q = torch.randint(0, 2**bits, (4, 64), generator=gen, dtype=torch.uint8)
    p = pack(q, bits)
    buf = torch.zeros(p.numel() + 1, dtype=torch.uint8)
    buf[1:] = p.reshape(-1)
    shifted = buf[1:].view(p.shape)  # storage offset 1
    assert torch.equal(unpack_float(shifted, bits, 64), q.float())


def test_linear_matches_dequantized_matmul():
    fmt = get_format("int4")
    w, x, b = torch.randn(48, 128), torch.randn(5, 128), torch.randn(48)
    parts = fmt.quantize(w)
    want = x @ fmt.dequantize(parts, (48, 128), torch.float32).T + b
    torch.testing.assert_close(fmt.linear(x, parts, (48, 128), b), want)


@pytest.mark.parametrize("name", list(BOUNDS))
@pytest.mark.parametrize("tokens", [1, 5])
def test_linear_on_the_cpu_goes_a_block_of_rows_at_a_time(name, tokens, monkeypatch):
    """A weight larger than CPU_BLOCK_ELEMENTS is dequantized in blocks of rows (never the
    whole matrix at once), the last block short, and gives the whole matrix's product."""
    import quant.base

    monkeypatch.setattr(quant.base, "CPU_BLOCK_ELEMENTS", 32 * 128)  # 32 rows of 128
    fmt = get_format(name)
    g = torch.Generator().manual_seed(tokens)
    w, x, b = (
        torch.randn(77, 128, generator=g),
        torch.randn(tokens, 128, generator=g),
        torch.randn(77, generator=g),
    )
    parts = fmt.quantize(w.to(torch.bfloat16) if name == "none" else w)
    want = x @ fmt.dequantize(parts, (77, 128), torch.float32).T + b
    shapes = []
    real = fmt.dequantize
    monkeypatch.setattr(
        fmt, "dequantize", lambda p, shape, dtype: shapes.append(shape) or real(p, shape, dtype)
    )
    got = fmt.linear(x, parts, (77, 128), b)
    assert shapes == [(32, 128), (32, 128), (13, 128)]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(BOUNDS))
def test_quantizing_a_block_of_rows_at_a_time_gives_the_same_bytes(name, monkeypatch):
    """What a store row holds is the same whether the weight is quantized whole or, on the
    CPU, a block of rows at a time (the last block short)."""
    import quant.base

    fmt = get_format(name)
    w = torch.randn(77, 128, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    whole = fmt.quantize(w)
    monkeypatch.setattr(quant.base, "CPU_BLOCK_ELEMENTS", 32 * 128)
    out = {k: torch.full_like(v, 7) for k, v in whole.items()}
    shapes = []
    real = fmt.quantize
    monkeypatch.setattr(fmt, "quantize", lambda x: shapes.append(tuple(x.shape)) or real(x))
    fmt.quantize_into(w, out, torch.bfloat16)
    assert shapes == [(32, 128), (32, 128), (13, 128)]
    for k, v in whole.items():
        assert torch.equal(out[k], v), k


def test_a_format_that_does_not_opt_in_is_handled_whole(monkeypatch):
    """Cutting by rows is opt-in (row_block): a format with a layout of its own, which
    does not declare how rows are cut, is dequantized and quantized whole."""
    import quant.base
    from quant.base import Part, QuantFormat

    class Flat(QuantFormat):  # the weight stored flat, as bytes of float32
        name = "flat"

        def parts(self, shape, dtype):
            return [Part("b", (shape[0] * shape[1] * 4,), torch.uint8)]

        def quantize(self, weight):
            return {"b": weight.float().contiguous().reshape(-1).view(torch.uint8)}

        def dequantize(self, parts, shape, dtype):
            return parts["b"].view(torch.float32).reshape(shape).to(dtype)

    monkeypatch.setattr(quant.base, "CPU_BLOCK_ELEMENTS", 16 * 64)
    fmt, w, x = Flat(), torch.randn(80, 64), torch.randn(3, 64)
    out = {"b": torch.empty(80 * 64 * 4, dtype=torch.uint8)}
    fmt.quantize_into(w, out, torch.float32)
    assert torch.equal(fmt.dequantize(out, (80, 64), torch.float32), w)
    torch.testing.assert_close(fmt.linear(x, out, (80, 64)), x @ w.T)


def test_quantize_into_refuses_parts_that_disagree_with_the_layout():
    fmt = get_format("int4")
    w = torch.randn(8, 64)
    good = fmt.quantize(w)
    out = {
        **{k: torch.empty_like(v) for k, v in good.items()},
        "scale": torch.empty(8, 1, dtype=torch.float32),
    }
    with pytest.raises(ValueError, match="part scale"):
        fmt.quantize_into(w, out, torch.float32)


def test_none_in_the_compute_dtype_is_one_matmul_on_the_weight_itself(monkeypatch):
    import quant.base

    monkeypatch.setattr(quant.base, "CPU_BLOCK_ELEMENTS", 16 * 64)
    fmt = get_format("none")
    w, x = torch.randn(80, 64), torch.randn(2, 64)
    parts = fmt.quantize(w)
    monkeypatch.setattr(fmt, "dequantize", lambda *a: pytest.fail("converted a weight already in x's dtype"))
    torch.testing.assert_close(fmt.linear(x, parts, (80, 64)), x @ w.T)


def test_nf4_rows_that_are_not_whole_blocks_are_dequantized_whole(monkeypatch):
    import quant.base

    monkeypatch.setattr(quant.base, "CPU_BLOCK_ELEMENTS", 16 * 96)
    fmt = get_format("nf4")
    w, x = torch.randn(40, 96), torch.randn(2, 96)  # a row of 96 is 1.5 blocks of 64
    parts = fmt.quantize(w)
    assert fmt.row_block(parts, (40, 96), 0, 16) is None
    want = x @ fmt.dequantize(parts, (40, 96), torch.float32).T
    torch.testing.assert_close(fmt.linear(x, parts, (40, 96)), want)


def test_unknown_format_lists_the_known_ones():
    with pytest.raises(UnknownNameError) as exc:
        get_format("int5")
    assert "int5" in str(exc.value)
    for name in available_formats():
        assert name in exc.value.hint


def test_int4_groups_use_their_whole_code_range():
    fmt = get_format("int4")
    parts = fmt.quantize(torch.randn(8, 128, generator=torch.Generator().manual_seed(0)))
    q = unpack(parts["q"], 4, 128).reshape(8, 2, 64)
    assert (q.amax(-1) == 15).all() and (q.amin(-1) == 0).all()  # each group's max and min at the ends


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_a_partial_last_group_is_padded_with_zeros(name):
    fmt = get_format(name)
    w = torch.randn(8, 100, generator=torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(w, (0, 28))
    got = fmt.dequantize(fmt.quantize(w), (8, 100), torch.float32)
    want = fmt.dequantize(fmt.quantize(padded), (8, 128), torch.float32)[:, :100]
    assert torch.equal(got, want)
