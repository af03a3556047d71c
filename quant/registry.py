"""Formats by name. Unknown names raise an error that lists the known ones."""

from __future__ import annotations

from collections.abc import Callable

from quant.base import QuantFormat
from runtime.errors import UnknownNameError

_REGISTRY: dict[str, Callable[[], QuantFormat]] = {}


def register_format(name: str, factory: Callable[[], QuantFormat]) -> None:
    _REGISTRY[name] = factory


def available_formats() -> list[str]:
    _load_builtin()
    return list(_REGISTRY)


def get_format(name: str) -> QuantFormat:
    _load_builtin()
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise UnknownNameError(
            f"unknown quantization '{name}'",
            hint=f"choose one of: {', '.join(_REGISTRY)}",
        ) from None


def _load_builtin() -> None:
    # always, not only while the registry is empty: a format registered before the built-in
    # ones were loaded must not hide them (an import already done costs a dict lookup)
    import quant.formats  # noqa: F401  (registers on import)
