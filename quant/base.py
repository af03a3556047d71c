"""The abstract quantization format: what a quantized weight is stored as, and back."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Part:
    """One tensor of a quantized weight: its name, shape and dtype (known before quantizing)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.dtype)


def tensor_nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


#: On the CPU, :meth:`QuantFormat.linear` dequantizes a large weight in blocks of rows of
#: about this many elements (8 MB in float32), each multiplied while it is still in cache,
#: instead of writing the whole matrix out first: 2x to 3x faster for a Mixtral expert
#: matrix at one token on a 2-core CPU, and no temporary of the whole matrix (704 MB in float32).
CPU_BLOCK_ELEMENTS = 2**21


class QuantFormat(ABC):
    """A way to store a weight matrix ``[out, in]`` in fewer bytes.

    Subclasses declare their parts up front (:meth:`parts`), so a store can lay out
    every expert before converting any, and implement a plain-torch reference
    :meth:`dequantize`. :meth:`linear` computes ``x @ W.T (+ bias)``; the default
    dequantizes first, kernels may fuse.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""

    def params(self) -> dict[str, Any]:
        """The settings that change the stored bytes (recorded in a store's manifest)."""
        return {}

    @property
    def store_name(self) -> str:
        """The folder of this format's store (a layout of a format for one device differs)."""
        return self.name

    def block_rows(self, rows: int) -> int:
        """How many rows a block of about ``rows`` rows holds in this layout (see row_block)."""
        return rows

    @abstractmethod
    def parts(self, shape: tuple[int, int], dtype: torch.dtype) -> list[Part]:
        """The tensors :meth:`quantize` returns for a weight of ``shape`` and ``dtype``."""

    @abstractmethod
    def quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """Quantize ``weight [out, in]``; returns the parts named by :meth:`parts`."""

    def quantize_into(self, weight: torch.Tensor, out: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
        """Quantize ``weight [out, in]`` (as ``dtype``) into the part tensors ``out`` (views of
        a store row). On the CPU a weight larger than ``CPU_BLOCK_ELEMENTS`` goes a block of
        rows at a time (where :meth:`row_block` can cut it), so the float temporaries of
        quantizing stay a block's size, not the matrix's (several times 704 MB for a Mixtral
        expert matrix). Every format's rows quantize independently, so the bytes are the same."""
        shape = (weight.shape[0], weight.shape[1])
        rows = self._cpu_block_rows(weight.device, out, shape)
        if rows is None:
            blocks = [(0, shape[0], out)]
        else:
            blocks = [(r, min(r + rows, shape[0]), None) for r in range(0, shape[0], rows)]
        for start, stop, dest in blocks:
            dest = dest or self.row_block(out, shape, start, stop)
            for name, t in self.quantize(weight[start:stop].to(dtype)).items():
                # what quantize() returns must be what parts() laid out: copy_ would convert
                if t.dtype != dest[name].dtype or t.numel() != dest[name].numel():
                    raise ValueError(f"{self.name} part {name}: quantize gave {t.dtype} x {t.numel()}, "
                                     f"the layout holds {dest[name].dtype} x {dest[name].numel()}")  # fmt: skip
                dest[name].copy_(t.reshape(dest[name].shape))

    @abstractmethod
    def dequantize(
        self, parts: dict[str, torch.Tensor], shape: tuple[int, int], dtype: torch.dtype
    ) -> torch.Tensor:
        """Reference: rebuild ``[out, in]`` in ``dtype`` with plain torch ops, on the parts' device."""

    def linear(
        self,
        x: torch.Tensor,
        parts: dict[str, torch.Tensor],
        shape: tuple[int, int],
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x [T, in] -> [T, out]``. Default: dequantize, then one GEMM; on the CPU, a weight
        larger than ``CPU_BLOCK_ELEMENTS`` a block of rows at a time (see there)."""
        n_out, n_in = shape
        rows = self._cpu_block_rows(x.device, parts, shape)
        if rows is None:
            return F.linear(x, self.dequantize(parts, shape, x.dtype), bias)
        y = x.new_empty(*x.shape[:-1], n_out)  # [T, out]
        for start in range(0, n_out, rows):
            stop = min(start + rows, n_out)
            w = self.dequantize(self.row_block(parts, shape, start, stop), (stop - start, n_in), x.dtype)
            y[..., start:stop] = F.linear(x, w, None if bias is None else bias[start:stop])
        return y

    def _cpu_block_rows(
        self, device: torch.device, parts: dict[str, torch.Tensor], shape: tuple[int, int]
    ) -> int | None:
        """Rows a block of a weight of ``shape`` handled on ``device`` holds (about
        ``CPU_BLOCK_ELEMENTS``), or None when it is handled whole: not on the CPU, small
        enough already, or a layout that cannot be cut at row boundaries."""
        rows = self.block_rows(max(1, CPU_BLOCK_ELEMENTS // shape[1]))
        if device.type != "cpu" or rows >= shape[0] or self.row_block(parts, shape, 0, rows) is None:
            return None
        return rows

    def repack_source(self) -> QuantFormat | None:
        """A format whose store holds this one's codes in another layout, so that a store of
        this format can be built from that store (:meth:`repack`) instead of quantizing the
        checkpoint again; None (the default): none does."""
        return None

    def repack(self, parts: dict[str, torch.Tensor], shape: tuple[int, int]) -> dict[str, torch.Tensor]:
        """This format's parts from :meth:`repack_source`'s ``parts`` of the same weight: the
        bytes :meth:`quantize` gives for it."""
        raise NotImplementedError(f"{self.name} is not repacked from another format")

    def row_block(
        self, parts: dict[str, torch.Tensor], shape: tuple[int, int], start: int, stop: int
    ) -> dict[str, torch.Tensor] | None:
        """The parts of rows ``[start, stop)`` of the weight, as views (a weight of shape
        ``(stop - start, in)``), or None if this weight's layout cannot be cut at row
        boundaries (then it is always handled whole). Default None: a format opts in."""
        return None

    @staticmethod
    def rows_of_row_major(parts: dict[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
        """:meth:`row_block` for a format whose every part has one row per output row."""
        return {k: v[start:stop] for k, v in parts.items()}

    def nbytes(self, shape: tuple[int, int], dtype: torch.dtype) -> int:
        return sum(p.nbytes for p in self.parts(shape, dtype))

    def bits_per_weight(self, shape: tuple[int, int], dtype: torch.dtype) -> float:
        """Stored bits per weight for this shape, scales and zero points included."""
        return 8 * self.nbytes(shape, dtype) / (shape[0] * shape[1])

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"
