"""The chat loop, separate from the command so tests drive it with scripted input.

On a terminal: the prompt of :mod:`promoe_cli.chat_input` (its keys are listed there and
in ``/help``), answers streamed under a live status line, Ctrl-C stops an answer after
its current token (a second Ctrl-C at once) and what was written stays in the
conversation; Ctrl-D or ``/quit`` leaves. Without a terminal (stdin piped, or
``TERM=dumb``) the same loop reads lines from stdin (triple-quoted blocks too) and writes
each answer as plain text, so scripts can drive it; slash commands work the same. Only
answers go to stdout: commands, notices and summaries go to stderr.
"""

from __future__ import annotations

import difflib
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import replace

from rich.markup import escape

from promoe_cli.chat_input import is_terminal, isatty, line_reader, no_echo, prompt_reader, unquote
from promoe_cli.console import err

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
    ("Up, Down, Ctrl-R", "history, and searching it (kept in $PROMOE_HOME/chat_history)"),
    ("Tab", "complete a slash command"),
    ("Ctrl-X Ctrl-E", "edit the message in $EDITOR"),
    ("Ctrl-C", "clear the line; while answering: stop after this token (twice: at once)"),
    ("Ctrl-D", "quit"),
    ("//text", "send a message that starts with /"),
]
WELCOME = "[dim]Enter sends · Alt+Enter new line · /help commands · Ctrl-C stops an answer · Ctrl-D quits[/]"


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
        return "temperature", number(float, lambda v: 0 <= v <= 100, "a number from 0 (greedy) to 100")
    if key == "top-p":
        return "top_p", number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
    if key == "max-new-tokens":
        return "max_new_tokens", number(int, lambda v: v >= 1, "a whole number of at least 1")
    if key == "seed":
        from runtime.generate import SEED_LIMIT

        return "seed", None if value.lower() == "none" else number(
            int, lambda v: 0 <= v < SEED_LIMIT, "a whole number (0 to 2^63-1) or none"
        )
    raise SettingError(f"no setting '{name}': temperature, top-p, max-new-tokens, seed")


def settings_line(cfg) -> str:
    seed = "none" if cfg.seed is None else cfg.seed
    return (f"temperature {cfg.temperature:g} · top-p {cfg.top_p:g} · max-new-tokens {cfg.max_new_tokens} · "
            f"seed {seed}")  # fmt: skip


class ChatSession:
    """One conversation with one loaded model: messages in, answers and figures out."""

    def __init__(self, lm, sampling, *, system=None, chat_template=True, trace=None, stats_json=None,
                 live=False, jsonl=False) -> None:  # fmt: skip
        from runtime.conversation import Conversation, context_limit, encoder, model_positions
        from runtime.kv_cache import PromptCache

        self.lm = lm
        self.sampling = sampling
        self.conversation = Conversation(system)
        self.encode = encoder(lm.tokenizer, chat_template)
        self.limit = context_limit(lm)
        self.model_max = model_positions(lm)
        self.trace = trace
        self.stats_json = stats_json
        self.prompt_keys = live  # a person types at the terminal's prompt: its keys apply, --jsonl or not
        self.live = live and not jsonl  # the status line under the answer (--jsonl prints records instead)
        self.jsonl = jsonl  # each answer as one JSON line on stdout, not streamed
        self.prompt_cache = PromptCache(lm.model)  # what the last answer computed, for the next one
        self.last = None  # the last answer's DoneEvent
        self.answers = 0
        self.hinted_length = False  # the summary has said how to let a stopped answer go on

    def handle(self, line: str) -> bool:
        """One line of input; False when the session should end."""
        text = line.strip()
        if not text:
            return True
        if text.startswith("/") and not text.startswith("//"):
            return self.command(text)
        message = text[1:] if text.startswith("//") else unquote(line)
        if not message.strip():  # an empty triple-quoted block: nothing to answer
            err.print('[dim]empty message, nothing sent (a message goes between the """ quotes)[/]')
            return True
        self.answer(message)
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
            starts = [c for c in COMMANDS if c.startswith(name)]  # a command cut short: /st is /stats
            close = starts if len(starts) == 1 else difflib.get_close_matches(name, list(COMMANDS), n=1)
            maybe = f" (did you mean {close[0]}?)" if close else ""
            err.print(f"[error]unknown command[/] {escape(name)}{maybe} · commands: {' '.join(COMMANDS)}")
        else:
            handler(arg.strip())
        return True

    def cmd_help(self, arg: str) -> None:
        from promoe_cli.render import key_value_grid

        err.print(key_value_grid([(f"{k} {a}".strip(), d) for k, (a, d) in COMMANDS.items()]))
        err.print()
        err.print(key_value_grid(KEYS if self.prompt_keys else [k for k in KEYS if k[0] == "//text"]))
        err.print()
        err.print(f"[dim]sampling: {settings_line(self.sampling)}\nWhile an answer is written, the status line "
                  "under it shows the expert-cache hit rate, decode tokens/s, prefetch accuracy and device "
                  "memory used / budget.[/]", soft_wrap=False)  # fmt: skip

    def cmd_stats(self, arg: str) -> None:
        from promoe_cli.render import STATS_LEGEND, stats_footer, stats_table, summary_text

        lm = self.lm
        n, total = lm.cache.num_slots, lm.spec.total_experts
        if lm.plan.in_place:
            prefetch = "none (experts read in place)"
        elif lm.all_loaded:
            prefetch = "none (every expert loaded)"
        else:
            prefetch = lm.options.predictor
        title = (f"Expert cache since start · {_plural(self.answers, 'answer')} · {n} of {total} experts "
                 f"resident ({100 * n / total:.0f}%) · policy {lm.options.policy} · prefetch {prefetch}")  # fmt: skip
        err.print(f"[bold]{title}[/]", soft_wrap=False)
        err.print(stats_table(lm.cache.stats, lm.plan.slots_per_layer))
        err.print(stats_footer(lm.cache.stats), soft_wrap=False)
        err.print(STATS_LEGEND, soft_wrap=False)
        if self.last is not None and self.last.stats is not None:
            err.print("[bold]last answer:[/] " + summary_text(self.last), soft_wrap=False)

    def cmd_reset(self, arg: str) -> None:
        turns = self.conversation.num_turns
        self.conversation.reset()
        kept = " (the system prompt stays)" if self.conversation.system else ""
        err.print(f"[dim]forgot {turns} turn{'s' if turns != 1 else ''}{kept}[/]")

    def cmd_system(self, arg: str) -> None:
        conv = self.conversation
        if not arg:
            shown = escape(conv.system) if conv.system else "[dim](none)[/]"
            err.print(f"system prompt: {shown}")
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
            err.print(settings_line(self.sampling))
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
            fit = conv.prepare(self.encode, self.limit, self.sampling.max_new_tokens, self.model_max)
        except PromoeError as exc:  # too long for the context, or refused by the chat template
            conv.retract()
            report(exc)
            if self.jsonl:  # a line for every message: a script pairs them up
                from promoe_cli.chat import write_jsonl

                write_jsonl(text, error=exc)
            return
        except BaseException:  # Ctrl-C while encoding: as if the message had not been sent
            conv.retract()
            raise
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
                self.answers += 1
            else:
                conv.retract()  # nothing was written: as if the message had not been sent
        self.last = done
        if self.jsonl:
            from promoe_cli.chat import write_jsonl

            write_jsonl(text, done)
        if done.stats is None:
            err.print("[warn]interrupted[/]")
        else:
            err.print(summary_text(done, hint=not self.hinted_length), soft_wrap=False)
            self.hinted_length = self.hinted_length or done.finish_reason == "length"
            if self.stats_json is not None:
                from promoe_cli.chat import write_stats

                write_stats(self.stats_json, self.lm, done)
        if self.live:
            err.print()

    def _stream(self, prompt_ids: list[int], cfg):
        """Generate and show one answer; Ctrl-C ends it early (see :class:`StopRequest`)."""
        import runtime.generate as generation
        from promoe_cli.render import LiveAnswer, PlainAnswer, QuietAnswer

        if self.jsonl:
            view = QuietAnswer()
        elif self.live:
            view = LiveAnswer(prompt_tokens=len(prompt_ids), cached_tokens=self.prompt_cache.reusable(prompt_ids),
                              budget=self.lm.plan.budget)  # fmt: skip
        else:
            view = PlainAnswer()
        stop = StopRequest(view.stopping)
        # the runtime polls should_stop between prefill chunks and decode steps: a safe point
        events = generation.stream_generate(
            self.lm,
            prompt_ids,
            cfg,
            trace=self.trace,
            should_stop=lambda: stop.requested,
            prompt_cache=self.prompt_cache,
        )
        pieces: list[str] = []
        ids: list[int] = []
        last = None
        try:
            with view, no_echo(self.live), stop:
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


def run_chat(lm, sampling, *, system=None, chat_template=True, trace=None, stats_json=None, stdin=None,
             read: Callable[[], str] | None = None, live: bool | None = None, jsonl: bool = False,
             ) -> ChatSession:  # fmt: skip
    """Read a message, stream the answer, repeat, until Ctrl-D, ``/quit`` or the end of stdin.

    ``read`` returns the next message and raises EOFError at the end (tests pass a script);
    by default it is the prompt on a terminal, else lines of ``stdin``. ``live`` shows the
    status line while answering (default: on a terminal).
    """
    stdin = stdin or sys.stdin
    terminal = is_terminal(stdin)
    if read is None:
        read = (
            prompt_reader({k: d for k, (_, d) in COMMANDS.items()})
            if terminal
            else line_reader(stdin, prompt=isatty(stdin))
        )
    session = ChatSession(lm, sampling, system=system, chat_template=chat_template, trace=trace,
                          stats_json=stats_json, live=terminal if live is None else live, jsonl=jsonl)  # fmt: skip
    if terminal:
        err.print(WELCOME)
        if not (chat_template and getattr(lm.tokenizer, "chat_template", None)):
            err.print("[dim]no chat template: the conversation is continued as plain text, so a completion "
                      "model writes on from what you type (try: def fibonacci(n):)[/]")  # fmt: skip
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
