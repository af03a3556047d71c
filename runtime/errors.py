"""Domain exceptions. Each carries a one-line message and a hint; the CLI renders them.

Library code raises these for anything a user can cause (a missing model, a bad size,
a budget that cannot fit). It never uses ``assert`` on user input.
"""

from __future__ import annotations


class PromoeError(Exception):
    """Base class: ``str(err)`` is one line, ``err.hint`` says what to do about it."""

    hint: str = ""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint


class ModelNotFoundError(PromoeError):
    """The model reference names no local directory, cached repo or known alias."""


class UnsupportedArchitectureError(PromoeError):
    """config.json's ``model_type`` is not one promoe knows how to offload."""


class CheckpointError(PromoeError):
    """The checkpoint is readable but unusable (missing tensors, a quantized format...)."""


class UsageError(PromoeError, ValueError):
    """An option's value cannot be used here (out of range for this model, a file that is not there)."""


class InvalidSizeError(PromoeError, ValueError):
    """A size, bandwidth or duration string could not be parsed."""


class InsufficientMemoryError(PromoeError):
    """The budget cannot hold what must live on the device. Carries the numbers."""

    def __init__(self, message: str, *, needed: int, available: int, hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.needed = needed
        self.available = available


class StoreError(PromoeError):
    """An expert store on disk is corrupt, stale or unreadable (normally rebuilt, not shown)."""


class ProfileError(PromoeError):
    """A device profile is missing or has a bad field."""


class UnknownNameError(PromoeError, KeyError):
    """A name looked up in a registry (quantization, policy, predictor) does not exist."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
