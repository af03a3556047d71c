"""Triton kernels for quantized experts on CUDA, and the rule that picks them.

The kernels live in :mod:`quant.kernels.groupwise` (``int4`` and ``int8``). This module
never imports triton itself: ``import quant`` and ``promoe --help`` stay fast and work on
machines without it. A format's ``linear()`` asks :func:`use_kernels` first and imports
the kernel module only when the answer is yes; otherwise it runs its plain-torch
reference (``dequantize`` + ``F.linear``), which the kernel tests compare against.

``PROMOE_KERNELS=0`` in the environment turns the kernels off (the reference path runs
on CUDA too, and torch's CPU int4 kernel is not used either), for debugging and for A/B
timings; :func:`kernels_enabled` reads it.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

# x with at most this many rows runs the fused dequantize-GEMV; more rows: dequantize + GEMM
DECODE_MAX_TOKENS = 8


@functools.cache
def triton_available() -> bool:
    """Whether ``triton`` can be imported (checked once; it ships with CUDA torch on Linux)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install counts as absent: fall back to the reference
        return False
    return True


def groupwise_supported(bits: int, group_size: int, symmetric: bool) -> bool:
    """Whether :mod:`quant.kernels.groupwise` has kernels for these codes: symmetric int8 and
    asymmetric int4 (scale and zero), in power-of-two groups."""
    pow2 = group_size >= 16 and group_size & (group_size - 1) == 0
    return pow2 and (bits, symmetric) in ((8, True), (4, False))


#: the oldest GPUs the kernels are built and checked for (Turing); older ones run the reference
MIN_CAPABILITY = (7, 5)


@functools.cache
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= MIN_CAPABILITY


def kernels_enabled() -> bool:
    """False when ``PROMOE_KERNELS=0``: every format then runs its plain-torch reference.
    Read at each call, so it can be switched while a model is loaded."""
    return os.environ.get("PROMOE_KERNELS", "1") != "0"


def use_kernels(x: torch.Tensor) -> bool:
    """True when ``x`` lives on a CUDA device of compute capability 7.5 or newer, triton
    imports, and kernels are not disabled."""
    return (
        x.is_cuda
        and kernels_enabled()
        and triton_available()
        and _capable(x.device.index if x.device.index is not None else torch.cuda.current_device())
    )
