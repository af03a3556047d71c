"""The chat loop, separate from the command so tests drive it with scripted input.

On a terminal the input is a prompt-toolkit prompt:

* Enter sends; Alt+Enter, Esc then Enter, or Ctrl-J inserts a new line; a message that
  starts with triple quotes (``\"\"\"``) goes on until a line ends with them; pasted text
  keeps its new lines;
* Up / Down walk the history, kept in ``$PROMOE_HOME/chat_history``; Ctrl-X Ctrl-E edits
  the message in ``$EDITOR``; Tab completes slash commands;
* Ctrl-C clears the line, or stops the answer being written after its current token (a
  second Ctrl-C stops it at once); what was written stays in the conversation; Ctrl-D on
  an empty line, or ``/quit``, leaves.

Without a terminal (stdin piped, or ``TERM=dumb``) the same loop reads lines from stdin
(``\"\"\"`` blocks too) and writes the answers as plain text, one per message, so scripts
can drive it; slash commands work the same.
"""

from __future__ import annotations

import difflib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace

from rich.markup import escape

from promoe_cli.console import err, out

COMMANDS: dict[str, tuple[str, str]] = {  # name -> (arguments, what it does)
    "/help": ("", "this help"),
    "/stats": ("", "the expert cache per layer: hits, misses, hit rate, prefetch accuracy"),
    "/reset": ("", "forget the conversation (the system prompt stays)"),
    "/system": ("[TEXT | none]", "show, set or clear the system prompt"),
    "/set": ("[NAME VALUE]", "temperature, top-p, max-new-tokens or seed; alone: show them"),
    "/quit": ("", "leave (also /exit, Ctrl-D)"),
}
ALIASES = {"/exit": "/quit", "/bye": "/quit", "/?": "/help"}
KEYS = [
    ("Enter", "send the message"),
    ("Alt+Enter, Esc Enter, Ctrl-J", 'new line (or start the message with """ and end it with """)'),
    ("Up, Down", "history (kept in $PROMOE_HOME/chat_history)"),
    ("Ctrl-X Ctrl-E", "edit the message in $EDITOR"),
    ("Ctrl-C", "clear the line; while answering: stop after this token (twice: at once)"),
    ("Ctrl-D", "quit"),
    ("//text", "send a message that starts with /"),
]
WELCOME = "[dim]Enter sends · Alt+Enter new line · /help commands · Ctrl-C stops an answer · Ctrl-D quits[/]"
QUOTE = '"""'


class SettingError(ValueError):
    """A bad ``/set``: one line for the user, the session goes on."""


def _parse_setting(name: str, value: str) -> tuple[str, object]:
    """``/set NAME VALUE`` -> (SamplingConfig field, value); SettingError with a one-line reason."""
    key = name.lower().replace("_", "-")
    key = {"temp": "temperature", "t": "temperature", "n": "max-new-tokens", "max-tokens": "max-new-tokens",
           "top_p": "top-p"}.get(key, key)  # fmt: skip

    def number(kind, ok: Callable[[float], bool], rule: str):
        try:
            v = kind(value)
        except ValueError:
            v = None
        if v is None or not ok(v):
            raise SettingError(f"{key} must be {rule}, not '{value}'")
        return v

    if key == "temperature":
        return "temperature", number(float, lambda v: 0 <= v <= 100, "a number from 0 (greedy) up")
    if key == "top-p":
        return "top_p", number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
    if key == "max-new-tokens":
        return "max_new_tokens", number(int, lambda v: v >= 1, "a whole number of at least 1")
    if key == "seed":
        return "seed", None if value.lower() == "none" else number(
            int, lambda v: v >= 0, "a whole number or none"
        )
    raise SettingError(f"no setting '{name}': temperature, top-p, max-new-tokens, seed")


def settings_line(cfg) -> str:
    seed = "none" if cfg.seed is None else cfg.seed
    return (f"temperature {cfg.temperature:g} · top-p {cfg.top_p:g} · max-new-tokens {cfg.max_new_tokens} · "
            f"seed {seed}")  # fmt: skip


def unquote(text: str) -> str:
    """A message written as a triple-quoted block, without its quotes."""
    s = text.strip()
    if s.startswith(QUOTE):
        s = s[3:]
        if s.rstrip().endswith(QUOTE):
            s = s.rstrip()[:-3]
        return s.strip("\n")
    return text


def _open_block(text: str) -> bool:
    """True while a triple-quoted message has not been closed yet (Enter then adds a line)."""
    s = text.strip()
    return s.startswith(QUOTE) and not (len(s) >= 6 and s.endswith(QUOTE))


class ChatSession:
    """One conversation with one loaded model: messages in, answers and figures out."""

    def __init__(self, lm, sampling, *, system=None, chat_template=True, trace=None, stats_json=None,
                 live=False) -> None:  # fmt: skip
        from runtime.conversation import Conversation, context_limit, encoder

        self.lm = lm
        self.sampling = sampling
        self.conversation = Conversation(system)
        self.encode = encoder(lm.tokenizer, chat_template)
        self.limit = context_limit(lm)
        self.trace = trace
        self.stats_json = stats_json
        self.live = live
        self.last = None  # the last answer's DoneEvent
        self.answers = 0

    def handle(self, line: str) -> bool:
        """One line of input; False when the session should end."""
        text = line.strip()
        if not text:
            return True
        if text.startswith("/") and not text.startswith("//"):
            return self.command(text)
        self.answer(text[1:] if text.startswith("//") else unquote(line))
        return True

    # -- slash commands --------------------------------------------------------------

    def command(self, text: str) -> bool:
        name, _, arg = text.partition(" ")
        name = ALIASES.get(name.lower(), name.lower())
        if name == "/quit":
            return False
        handler = {"/help": self.cmd_help, "/stats": self.cmd_stats, "/reset": self.cmd_reset,
                   "/system": self.cmd_system, "/set": self.cmd_set}.get(name)  # fmt: skip
        if handler is None:
            close = difflib.get_close_matches(name, list(COMMANDS), n=1)
            maybe = f" (did you mean {close[0]}?)" if close else ""
            err.print(f"[error]unknown command[/] {escape(name)}{maybe} · commands: {' '.join(COMMANDS)}")
        else:
            handler(arg.strip())
        return True

    def cmd_help(self, arg: str) -> None:
        from promoe_cli.render import key_value_grid

        out.print(key_value_grid([(f"{k} {a}".strip(), d) for k, (a, d) in COMMANDS.items()]))
        if self.live:
            out.print()
            out.print(key_value_grid(KEYS))
        out.print()
        out.print(f"[dim]sampling: {settings_line(self.sampling)}\nWhile an answer is written, the status line "
                  "under it shows the expert-cache hit rate, decode tokens/s, prefetch accuracy and device "
                  "memory used / budget.[/]", soft_wrap=False)  # fmt: skip

    def cmd_stats(self, arg: str) -> None:
        from promoe_cli.render import STATS_LEGEND, stats_footer, stats_table, summary_text

        lm = self.lm
        n, total = lm.cache.num_slots, lm.spec.total_experts
        title = (f"Expert cache since start · {_plural(self.answers, 'answer')} · {n} of {total} experts "
                 f"resident ({100 * n / total:.0f}%) · policy {lm.options.policy} · prefetch {lm.options.predictor}")  # fmt: skip
        out.print(f"[bold]{title}[/]", soft_wrap=False)
        out.print(stats_table(lm.cache.stats, lm.plan.slots_per_layer))
        out.print(stats_footer(lm.cache.stats), soft_wrap=False)
        out.print(STATS_LEGEND, soft_wrap=False)
        if self.last is not None and self.last.stats is not None:
            out.print("[bold]last answer:[/] " + summary_text(self.last), soft_wrap=False)

    def cmd_reset(self, arg: str) -> None:
        turns = self.conversation.num_turns
        self.conversation.reset()
        kept = " (the system prompt stays)" if self.conversation.system else ""
        err.print(f"[dim]forgot {turns} turn{'s' if turns != 1 else ''}{kept}[/]")

    def cmd_system(self, arg: str) -> None:
        conv = self.conversation
        if not arg:
            shown = escape(conv.system) if conv.system else "[dim](none)[/]"
            out.print(f"system prompt: {shown}")
            err.print("[dim]/system TEXT sets it, /system none clears it[/]")
        elif arg.lower() == "none":
            conv.system = None
            err.print("[dim]system prompt cleared[/]")
        else:
            conv.system = unquote(arg)
            err.print("[dim]system prompt set; it applies from the next answer[/]")

    def cmd_set(self, arg: str) -> None:
        parts = arg.split()
        if not parts:
            out.print(settings_line(self.sampling))
            return
        try:
            if len(parts) != 2:
                raise SettingError("usage: /set NAME VALUE, e.g. /set temperature 0.2")
            field, value = _parse_setting(*parts)
        except SettingError as exc:
            err.print(f"[error]error:[/] {escape(str(exc))}")
            return
        self.sampling = replace(self.sampling, **{field: value})
        err.print(f"[dim]{settings_line(self.sampling)}[/]")

    # -- answers ---------------------------------------------------------------------

    def answer(self, text: str) -> None:
        from promoe_cli.errors import report
        from promoe_cli.render import summary_text
        from runtime.errors import PromoeError

        conv = self.conversation
        conv.ask(text)
        try:
            fit = conv.prepare(self.encode, self.limit, self.sampling.max_new_tokens)
        except PromoeError as exc:  # too long for the context, or refused by the chat template
            conv.retract()
            report(exc)
            return
        if fit.dropped_turns:
            n = fit.dropped_turns
            kept = " [dim](the system prompt stays)[/]" if conv.system else ""
            err.print(f"[warn]dropped the {'oldest turn' if n == 1 else f'{n} oldest turns'} to fit the "
                      f"{self.limit}-token context[/]{kept}")  # fmt: skip
        done = None
        try:
            done = self._stream(fit.prompt_ids, replace(self.sampling, max_new_tokens=fit.max_new_tokens))
        finally:
            if done is not None and (done.text or done.finish_reason != "interrupted"):
                conv.answer(done.text)
            else:
                conv.retract()  # nothing was written: as if the message had not been sent
        self.answers += 1
        self.last = done
        if done.stats is None:
            err.print("[warn]interrupted[/]")
        else:
            err.print(summary_text(done), soft_wrap=False)
            if self.stats_json is not None:
                from promoe_cli.chat import write_stats

                write_stats(self.stats_json, self.lm, done)
        if self.live:
            err.print()

    def _stream(self, prompt_ids: list[int], cfg):
        """Generate and show one answer; Ctrl-C ends it early (see :class:`StopRequest`)."""
        import runtime.generate as generation
        from promoe_cli.render import LiveAnswer, PlainAnswer

        events = generation.stream_generate(self.lm, prompt_ids, cfg, trace=self.trace)
        if self.live:
            view = LiveAnswer(prompt_tokens=len(prompt_ids), budget=self.lm.plan.budget)
        else:
            view = PlainAnswer()
        pieces: list[str] = []
        ids: list[int] = []
        last = None
        try:
            with view, _no_echo(self.live), StopRequest(view.stopping) as stop:
                for ev in events:
                    if isinstance(ev, generation.DoneEvent):
                        return ev
                    pieces.append(ev.text)
                    ids.append(ev.token_id)
                    last = ev
                    view.add(ev.text, ev.stats)
                    if stop.requested:
                        break
        except KeyboardInterrupt:  # a second Ctrl-C, or one that came while rendering
            pass
        finally:
            events.close()
        return generation.DoneEvent("".join(pieces), ids, "interrupted", last.stats if last else None)


class StopRequest:
    """Ctrl-C while an answer is written: the first stops it after the current token, the second now.

    The first press only sets ``requested``, which the loop checks between tokens, so the
    model is never interrupted half-way through a forward pass (where the expert cache's
    bookkeeping could be left inconsistent); a second press raises KeyboardInterrupt at
    once, which :func:`runtime.generate.stream_generate` turns into an "interrupted" end.
    A KeyboardInterrupt raised some other way (a test's hook) behaves like the second press.
    Only the main thread can take signals; elsewhere this does nothing.
    """

    def __init__(self, on_request: Callable[[], None] = lambda: None) -> None:
        self.requested = False
        self.on_request = on_request
        self._saved = None
        self._installed = False

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._saved = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.on_request()

    def __exit__(self, *exc) -> None:
        if self._installed:
            signal.signal(
                signal.SIGINT, self._saved if self._saved is not None else signal.default_int_handler
            )


@contextmanager
def _no_echo(enabled: bool) -> Iterator[None]:
    """Keys typed while an answer streams are not echoed into it; the next prompt gets them.

    Only ECHO is turned off: Ctrl-C still interrupts, and typed-ahead text waits in the
    terminal's line buffer until prompt-toolkit reads it.
    """
    saved = None
    if enabled and _isatty(sys.stdin):
        try:
            import termios

            fd = sys.stdin.fileno()
            saved = termios.tcgetattr(fd)
            quiet = list(saved)
            quiet[3] &= ~termios.ECHO
            termios.tcsetattr(fd, termios.TCSANOW, quiet)
        except Exception:  # not a POSIX terminal (termios.error, ImportError...): echo stays on
            saved = None
    try:
        yield
    finally:
        if saved is not None:
            termios.tcsetattr(fd, termios.TCSANOW, saved)


# -- reading input ------------------------------------------------------------------


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
        text = readline()
        lines = [text]
        while _open_block("\n".join(lines)):
            try:
                lines.append(readline())
            except EOFError:
                break
        return "\n".join(lines)

    return read


def make_prompt_session(history_path=None, **io):
    """The prompt-toolkit session: key bindings above, history, slash-command completion."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.auto_suggest import AutoSuggestFromHistory
    from prompt_toolkit.completion import Completer, Completion
    from prompt_toolkit.history import FileHistory, InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings
    from prompt_toolkit.styles import Style

    keys = KeyBindings()

    @keys.add("enter")
    def _enter(event) -> None:
        buf = event.current_buffer
        if _open_block(buf.text):
            buf.insert_text("\n")
        else:
            buf.validate_and_handle()

    @keys.add("escape", "enter")
    @keys.add("c-j")
    def _newline(event) -> None:
        event.current_buffer.insert_text("\n")

    class SlashCompleter(Completer):
        def get_completions(self, document, complete_event):
            text = document.text_before_cursor
            if not text.startswith("/") or "\n" in text:
                return
            if " " not in text:
                for name, (_args, what) in COMMANDS.items():
                    if name.startswith(text.lower()):
                        yield Completion(name, -len(text), display_meta=what)
            elif text.startswith("/set ") and text.count(" ") == 1:
                word = text[5:]
                for name in ("temperature", "top-p", "max-new-tokens", "seed"):
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
        placeholder=[("class:placeholder", "Send a message (/help for commands)")],
        style=Style.from_dict(
            {"prompt": "ansicyan bold", "continuation": "ansibrightblack", "placeholder": "ansibrightblack"}
        ),  # fmt: skip
        **io,
    )


def prompt_reader() -> Callable[[], str]:
    from runtime.resolve import promoe_home

    session = make_prompt_session(promoe_home() / "chat_history")
    return session.prompt


def is_terminal(stdin) -> bool:
    """A person at a terminal (the prompt and the live status), or a script (plain lines)?"""
    try:
        tty = stdin.isatty()
    except (AttributeError, ValueError):
        tty = False
    return tty and out.is_terminal and os.environ.get("TERM", "") not in ("dumb", "unknown")


def run_chat(lm, sampling, *, system=None, chat_template=True, trace=None, stats_json=None, stdin=None,
             read: Callable[[], str] | None = None, live: bool | None = None) -> ChatSession:  # fmt: skip
    """Read a message, stream the answer, repeat, until Ctrl-D, ``/quit`` or the end of stdin.

    ``read`` returns the next message and raises EOFError at the end (tests pass a script);
    by default it is the prompt on a terminal, else lines of ``stdin``. ``live`` shows the
    status line while answering (default: on a terminal).
    """
    stdin = stdin or sys.stdin
    terminal = is_terminal(stdin)
    if read is None:
        read = prompt_reader() if terminal else line_reader(stdin, prompt=_isatty(stdin))
    session = ChatSession(lm, sampling, system=system, chat_template=chat_template, trace=trace,
                          stats_json=stats_json, live=terminal if live is None else live)  # fmt: skip
    if terminal:
        err.print(WELCOME)
        err.print()
    while True:
        try:
            line = read()
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh line
            if terminal:
                err.print("[dim](Ctrl-D or /quit to leave)[/]")
            continue
        except EOFError:
            break
        try:
            if not session.handle(line):
                break
        except KeyboardInterrupt:  # between the answer and the prompt: nothing to undo
            err.print("[warn]interrupted[/]")
    return session


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
