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

    @abstractmethod
    def parts(self, shape: tuple[int, int], dtype: torch.dtype) -> list[Part]:
        """The tensors :meth:`quantize` returns for a weight of ``shape`` and ``dtype``."""

    @abstractmethod
    def quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """Quantize ``weight [out, in]``; returns the parts named by :meth:`parts`."""

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
        """``x [T, in] -> [T, out]``. Default: dequantize, then one GEMM."""
        return F.linear(x, self.dequantize(parts, shape, x.dtype), bias)

    def nbytes(self, shape: tuple[int, int], dtype: torch.dtype) -> int:
        return sum(p.nbytes for p in self.parts(shape, dtype))

    def bits_per_weight(self, shape: tuple[int, int], dtype: torch.dtype) -> float:
        """Stored bits per weight for this shape, scales and zero points included."""
        return 8 * self.nbytes(shape, dtype) / (shape[0] * shape[1])

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"
