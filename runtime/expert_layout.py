"""One expert as one contiguous byte row, so moving an expert is a single copy.

An expert is two matrices in ``F.linear`` orientation, ``gate_up [2I, H]`` (gate rows,
then up rows; interleaved for GPT-OSS, exactly as its transformers module orders them)
and ``down [H, I]``, plus optional biases. A quantization format turns each matrix into
a few parts; :class:`ExpertLayout` places every part at a 64-byte-aligned offset of a
uint8 row and hands out typed views of any row (host store or device slot) without
copying.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from quant import QuantFormat
from quant.base import tensor_nbytes

ALIGN = 64
_DTYPE_NAMES = {
    torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
    torch.uint8: "uint8", torch.int8: "int8", torch.int32: "int32",
}  # fmt: skip
_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}


@dataclass(frozen=True)
class ExpertShape:
    hidden: int
    intermediate: int
    has_bias: bool
    dtype: torch.dtype  # the checkpoint's dtype (what "none" stores)

    def matrices(self) -> dict[str, tuple[int, int]]:
        return {"gate_up": (2 * self.intermediate, self.hidden), "down": (self.hidden, self.intermediate)}

    def biases(self) -> dict[str, tuple[int]]:
        if not self.has_bias:
            return {}
        return {"gate_up_bias": (2 * self.intermediate,), "down_bias": (self.hidden,)}

    @property
    def num_weights(self) -> int:
        return 3 * self.hidden * self.intermediate


@dataclass(frozen=True)
class Field:
    name: str  # "gate_up.q", "down.scale", "gate_up_bias", ...
    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.dtype)


@dataclass
class ExpertWeights:
    """Typed views of one expert's row: quantized parts per matrix, and raw biases."""

    gate_up: dict[str, torch.Tensor]
    down: dict[str, torch.Tensor]
    gate_up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None


class ExpertLayout:
    """Where each part of an expert lives inside its byte row."""

    def __init__(self, shape: ExpertShape, fmt: QuantFormat) -> None:
        self.shape = shape
        self.fmt = fmt
        fields: list[Field] = []
        offset = 0

        def add(name: str, shp: tuple[int, ...], dtype: torch.dtype) -> None:
            nonlocal offset
            f = Field(name, offset, tuple(shp), dtype)
            fields.append(f)
            offset += (f.nbytes + ALIGN - 1) // ALIGN * ALIGN

        for mat, mshape in shape.matrices().items():
            for part in fmt.parts(mshape, shape.dtype):
                add(f"{mat}.{part.name}", part.shape, part.dtype)
        for name, bshape in shape.biases().items():
            add(name, bshape, shape.dtype)
        self.fields = tuple(fields)
        self.nbytes = offset

    def pack(self, tensors: dict[str, torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
        """Quantize ``{"gate_up": W, "down": W, [biases]}`` into one uint8 row (``out`` if given)."""
        row = torch.zeros(self.nbytes, dtype=torch.uint8) if out is None else out
        views = self.views(row)
        for mat, mshape in self.shape.matrices().items():
            w = tensors[mat]
            if tuple(w.shape) != mshape:
                raise ValueError(f"{mat}: expected shape {mshape}, got {tuple(w.shape)}")
            self.fmt.quantize_into(w, getattr(views, mat), self.shape.dtype)
        for name in self.shape.biases():
            getattr(views, name).copy_(tensors[name])
        return row

    def views(self, row: torch.Tensor) -> ExpertWeights:
        """Typed, zero-copy views into ``row`` (uint8 ``[nbytes]``, any device)."""
        parts: dict[str, Any] = {"gate_up": {}, "down": {}}
        for f in self.fields:
            t = row[f.offset : f.offset + f.nbytes].view(f.dtype).view(f.shape)
            mat, _, part = f.name.partition(".")
            if part:
                parts[mat][part] = t
            else:
                parts[mat] = t
        return ExpertWeights(**parts)

    def dequantize(self, w: ExpertWeights, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Reference: full-precision matrices (and biases) from a row's views."""
        mats = self.shape.matrices()
        out = {m: self.fmt.dequantize(getattr(w, m), mats[m], dtype) for m in mats}
        for name in self.shape.biases():
            out[name] = getattr(w, name).to(dtype)
        return out

    # -- manifest -------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "hidden": self.shape.hidden,
            "intermediate": self.shape.intermediate,
            "has_bias": self.shape.has_bias,
            "dtype": _DTYPE_NAMES[self.shape.dtype],
            "nbytes": self.nbytes,
            "fields": [[f.name, f.offset, list(f.shape), _DTYPE_NAMES[f.dtype]] for f in self.fields],
        }

    def matches(self, data: dict[str, Any]) -> bool:
        return data == self.to_json()


def dtype_from_name(name: str) -> torch.dtype:
    return _DTYPES[name]
