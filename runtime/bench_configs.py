"""The configurations ``promoe bench`` can run, and checking a user's choice of them.

Kept free of torch so the CLI can list them in ``--help`` and refuse a bad ``--configs``
before anything heavy is imported or measured.
"""

from __future__ import annotations

from collections.abc import Sequence

from runtime.errors import UnknownNameError, UsageError

ALL_CONFIGS = (
    "resident",
    "on-demand",
    "lru",
    "lfu",
    "arc",
    "cross-layer",
    "learned",
    "low-bit",
    "host-misses",
    "transformers",
    "accelerate",
)
REACTIVE = ("lru", "lfu", "arc")
PREFETCHING = ("cross-layer", "learned", "low-bit", "host-misses")
BASELINES = ("transformers", "accelerate")  # run on the prompts a promoe configuration made
# the configurations that need least (no predictor to train, no room for every expert), in
# the order a hint suggests one
FALLBACKS = ("lru", "on-demand", "lfu", "arc", "cross-layer", "host-misses", "low-bit")


def fallback_config(tried: Sequence[str]) -> str | None:
    """The configuration a hint may suggest beside ``tried``: the first fallback not tried."""
    return next((c for c in FALLBACKS if c not in tried), None)


def select_configs(names: Sequence[str] | None) -> list[str]:
    """``names`` in the documented order (on-demand and the reactive policies run before
    prefetch, which picks the best of them); all of them for None."""
    if names is None:
        return list(ALL_CONFIGS)
    if not names:
        raise UsageError("--configs is empty", hint=f"name one or more of: {', '.join(ALL_CONFIGS)}")
    unknown = [n for n in names if n not in ALL_CONFIGS]
    if unknown:
        raise UnknownNameError(
            f"unknown bench configuration '{unknown[0]}'", hint=f"choose from: {', '.join(ALL_CONFIGS)}"
        )
    return [c for c in ALL_CONFIGS if c in names]
