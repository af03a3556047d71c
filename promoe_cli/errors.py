"""One table turns library exceptions into a one-line message, a hint, and an exit code.

Tracebacks are shown only with ``PROMOE_DEBUG=1``; an unexpected exception is reported
as an internal error in one line, with that advice.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rich.markup import escape

from promoe_cli.console import err

# exception class name -> exit code (names, so this module imports nothing heavy)
EXIT_CODES = {
    "ModelNotFoundError": 2,
    "UnsupportedArchitectureError": 3,
    "CheckpointError": 3,
    "InvalidSizeError": 2,
    "UsageError": 2,
    "UnknownNameError": 2,
    "InsufficientMemoryError": 4,
    "ProfileError": 2,
    "TraceError": 2,
    "StoreError": 5,
    "PromoeError": 1,
}


def _exit_code(exc: BaseException) -> int:
    for cls in type(exc).__mro__:
        if cls.__name__ in EXIT_CODES:
            return EXIT_CODES[cls.__name__]
    return 1


def report(exc: BaseException) -> int:
    """Print ``exc`` as 'error: ...' and 'hint: ...' on stderr; returns the exit code."""
    err.print(f"[error]error:[/] {escape(str(exc))}")
    hint = getattr(exc, "hint", "")
    if hint:
        err.print(f"[hint]hint:[/] {escape(hint)}")
    return _exit_code(exc)


@contextmanager
def handle_errors() -> Iterator[None]:
    from runtime.errors import PromoeError

    debug = bool(os.environ.get("PROMOE_DEBUG"))
    try:
        yield
    except PromoeError as exc:
        if debug:
            raise
        sys.exit(report(exc))
    except KeyboardInterrupt:
        err.print("[warn]interrupted[/]")
        sys.exit(130)
    except BrokenPipeError:  # whoever read stdout stopped reading (`| head`): stop quietly, as
        _silence_stdout()  # rich's console does when its own write finds the pipe broken
        sys.exit(1)
    except OSError as exc:  # a path that is a folder, a full disk, no permission...
        if debug:
            raise
        where = f": {exc.filename}" if exc.filename else ""
        err.print(f"[error]error:[/] {escape(exc.strerror or type(exc).__name__)}{escape(str(where))}")
        err.print(
            "[hint]hint:[/] check the paths given on the command line and PROMOE_HOME (where promoe keeps its cache)"
        )
        sys.exit(2)
    except (SystemExit, Exception) as exc:
        if isinstance(exc, SystemExit) or debug:
            raise
        # click/typer raise their own exceptions for usage errors: let them through
        if type(exc).__module__.startswith(("click", "typer")):
            raise
        err.print(f"[error]internal error:[/] {escape(type(exc).__name__)}: {escape(str(exc))}")
        err.print(
            "[hint]hint:[/] this is a promoe bug; run again with PROMOE_DEBUG=1 for the traceback and report it"
        )
        sys.exit(1)


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the flush at exit finds no broken pipe either."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
