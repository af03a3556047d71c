"""All terminal output goes through these two consoles: results on stdout, the rest on stderr."""

from __future__ import annotations

from rich.console import Console
from rich.theme import Theme

THEME = Theme(
    {
        "error": "bold red",
        "hint": "yellow",
        "dim": "grey50",
        "good": "green",
        "warn": "yellow",
        "accent": "cyan",
    }
)

out = Console(theme=THEME, highlight=False, soft_wrap=True)  # results: completions, tables, JSON
err = Console(theme=THEME, highlight=False, stderr=True, soft_wrap=True)  # progress, banners, notices, errors
