"""Reading the chat's input: a prompt-toolkit prompt on a terminal, plain lines otherwise.

The prompt's keys: Enter sends; Alt+Enter, Esc then Enter, or Ctrl-J inserts a new line;
a message that starts with triple quotes goes on until a line ends with them (Enter then
adds a line; in pipes too); pasted text keeps its new lines; Up / Down and Ctrl-R search
the history (``$PROMOE_HOME/chat_history``); Tab completes slash commands; Ctrl-X Ctrl-E
opens ``$EDITOR``; Ctrl-C raises KeyboardInterrupt, Ctrl-D on an empty line EOFError.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from promoe_cli.console import err, out

QUOTE = '"""'
SETTINGS = ("temperature", "top-p", "max-new-tokens", "seed")


def unquote(text: str) -> str:
    """A message written as a triple-quoted block, without its quotes."""
    s = text.strip()
    if s.startswith(QUOTE):
        s = s[3:]
        if s.rstrip().endswith(QUOTE):
            s = s.rstrip()[:-3]
        return s.strip("\n")
    return text


def open_block(text: str) -> bool:
    """True while a triple-quoted message has not been closed yet (Enter then adds a line)."""
    s = text.strip()
    return s.startswith(QUOTE) and not (len(s) >= 6 and s.endswith(QUOTE))


@contextmanager
def no_echo(enabled: bool) -> Iterator[None]:
    """Keys typed while an answer streams are not echoed into it; the next prompt gets them.

    Only ECHO is turned off: Ctrl-C still interrupts, and typed-ahead text waits in the
    terminal's line buffer until prompt-toolkit reads it.
    """
    saved = None
    if enabled and isatty(sys.stdin):
        try:
            import termios

            fd = sys.stdin.fileno()
            saved = termios.tcgetattr(fd)
            quiet = list(saved)
            quiet[0] &= ~termios.ICRNL  # a typed-ahead Enter stays Enter (sends), not Ctrl-J (new line)
            quiet[3] &= ~termios.ECHO
            termios.tcsetattr(fd, termios.TCSANOW, quiet)
        except Exception:  # not a POSIX terminal (termios.error, ImportError...): echo stays on
            saved = None
    try:
        yield
    finally:
        if saved is not None:
            termios.tcsetattr(fd, termios.TCSANOW, saved)


def line_reader(stdin, prompt: bool = False) -> Callable[[], str]:
    """Lines from a plain stream; a triple-quoted block is one message. EOFError at the end."""

    def readline() -> str:
        line = stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\r\n")

    def read() -> str:
        if prompt:
            err.file.write(">>> ")
            err.file.flush()
        try:
            text = readline()
        except EOFError:
            if prompt:  # Ctrl-D at a prompt: end its line
                err.file.write("\n")
            raise
        lines = [text]
        while open_block("\n".join(lines)):
            try:
                lines.append(readline())
            except EOFError:
                break
        return "\n".join(lines)

    return read


def make_prompt_session(commands: dict[str, str] | None = None, history_path=None, **io):
    """The prompt-toolkit session: the keys above, history, completion of ``commands`` (name -> help)."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.application.current import get_app
    from prompt_toolkit.auto_suggest import AutoSuggestFromHistory
    from prompt_toolkit.completion import Completer, Completion
    from prompt_toolkit.filters import is_searching
    from prompt_toolkit.history import FileHistory, InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings
    from prompt_toolkit.styles import Style

    keys = KeyBindings()

    @keys.add("enter", filter=~is_searching)  # while Ctrl-R searches, Enter accepts the match
    def _enter(event) -> None:
        buf = event.current_buffer
        if open_block(buf.text):
            buf.insert_text("\n")
        else:
            buf.validate_and_handle()

    @keys.add("escape", "enter", filter=~is_searching)
    @keys.add("c-j", filter=~is_searching)
    def _newline(event) -> None:
        event.current_buffer.insert_text("\n")

    class SlashCompleter(Completer):
        def get_completions(self, document, complete_event):
            text = document.text_before_cursor
            if not text.startswith("/") or "\n" in text:
                return
            if " " not in text:
                for name, what in (commands or {}).items():
                    if name.startswith(text.lower()):
                        yield Completion(name, -len(text), display_meta=what)
            elif text.startswith("/set ") and text.count(" ") == 1:
                word = text[5:]
                for name in SETTINGS:
                    if name.startswith(word.lower()):
                        yield Completion(name, -len(word))

    history = InMemoryHistory()
    if history_path is not None:
        try:
            history_path.parent.mkdir(parents=True, exist_ok=True)
            history_path.touch()
            history = FileHistory(str(history_path))
        except OSError:
            pass  # a read-only home: history for this session only

    def placeholder():  # not while Ctrl-R searches: the match is shown in the empty line then
        if get_app().layout.is_searching:
            return ""
        return [("class:placeholder", "Send a message (/help for commands)")]

    def continuation(width: int, line_number: int, wrap_count: int):
        return [("class:continuation", "" if wrap_count else "... ".rjust(width))]

    return PromptSession(
        message=[("class:prompt", ">>> ")],
        multiline=True,
        key_bindings=keys,
        history=history,
        auto_suggest=AutoSuggestFromHistory(),
        completer=SlashCompleter(),
        complete_while_typing=True,
        enable_open_in_editor=True,
        prompt_continuation=continuation,
        placeholder=placeholder,
        style=Style.from_dict(
            {"prompt": "ansicyan bold", "continuation": "ansibrightblack", "placeholder": "ansibrightblack"}
        ),  # fmt: skip
        **io,
    )


def prompt_reader(commands: dict[str, str] | None = None) -> Callable[[], str]:
    from runtime.resolve import promoe_home

    session = make_prompt_session(commands, promoe_home() / "chat_history")
    return session.prompt


def is_terminal(stdin) -> bool:
    """A person at a terminal (the prompt and the live status), or a script (plain lines)?"""
    return isatty(stdin) and out.is_terminal and os.environ.get("TERM", "") not in ("dumb", "unknown")


def isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
