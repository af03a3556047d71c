"""All terminal output goes through these two consoles: results on stdout, the rest on stderr."""

from __future__ import annotations

import os
import sys

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


def _width(stream) -> int | None:
    """Rich's own choice on a terminal or with $COLUMNS; otherwise (a file, a pipe) wide, not 80 columns,
    so tables written to a file keep whole headers and numbers."""
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    return None if tty or os.environ.get("COLUMNS") else 160


# results (completions, the tables of plan, bench and profile-device, JSON) on stdout; progress,
# banners, notices, errors and what the chat's slash commands show on stderr
out = Console(theme=THEME, highlight=False, soft_wrap=True, width=_width(sys.stdout))
err = Console(theme=THEME, highlight=False, stderr=True, soft_wrap=True, width=_width(sys.stderr))
