"""Quantization formats for expert weights, behind a registry by name.

Every format quantizes a 2-D weight ``[out, in]`` (the ``F.linear`` orientation) into a
few named parts and has a plain-torch reference :meth:`QuantFormat.dequantize` that
works on any device. Faster paths (Triton kernels on CUDA) override
:meth:`QuantFormat.linear` and are tested against that reference.

>>> from quant import get_format
>>> fmt = get_format("int4")           # groupwise, group 64
>>> parts = fmt.quantize(w)            # {"q": uint8, "scale": fp16, "zero": fp16}
>>> w_hat = fmt.dequantize(parts, w.shape, torch.float32)
"""

from quant.base import Part, QuantFormat
from quant.registry import available_formats, get_format, register_format

__all__ = ["Part", "QuantFormat", "available_formats", "get_format", "register_format"]
