"""The chat loop driven with scripted input and a real tiny model; context trimming; piped stdin."""

from __future__ import annotations

import io
import json
import os
import re
import signal

import pytest
from rich.console import Console
from typer.testing import CliRunner

import runtime.generate as generation
from promoe_cli.chat_input import line_reader, make_prompt_session, unquote
from promoe_cli.main import app
from promoe_cli.render import LiveAnswer, status_text
from promoe_cli.repl import ChatSession, run_chat
from runtime.conversation import Conversation, PromptTooLongError, fit_to_context, split_turns
from runtime.generate import SamplingConfig, encode_messages, generate
from tests.helpers import budget_for_slots, load_small

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
GREEDY = SamplingConfig(max_new_tokens=6, temperature=0, ignore_eos=True)
ANSI = re.compile(r"\x1b\[")


@pytest.fixture(scope="module")
def lm(tiny_model, tmp_path_factory):
    lm = load_small(
        tiny_model("mixtral"), quant="int8", slots_per_layer=2, home=tmp_path_factory.mktemp("home")
    )
    lm.tokenizer.chat_template = TEMPLATE
    yield lm
    lm.close()


@pytest.fixture
def calls(lm, monkeypatch):
    """Every generation the chat starts: its prompt ids, sampling settings and final event."""
    real = generation.stream_generate
    seen: list[dict] = []

    def spy(lm_, prompt_ids, cfg, **kw):
        call = {"ids": list(prompt_ids), "cfg": cfg, "done": None, "tokens": 0}
        seen.append(call)
        for ev in real(lm_, prompt_ids, cfg, **kw):
            if isinstance(ev, generation.DoneEvent):
                call["done"] = ev
            else:
                call["tokens"] += 1
            yield ev

    monkeypatch.setattr(generation, "stream_generate", spy)
    yield seen
    lm.runtime.hooks.clear()


def script(*items):
    """A ``read`` function: strings are typed lines, exceptions are raised, callables run first."""
    it = iter(items)

    def read() -> str:
        for item in it:
            if callable(item) and not isinstance(item, type):
                item()
                continue
            if isinstance(item, (BaseException, type)):
                raise item
            return item
        raise EOFError

    return read


def chat(lm, *lines, sampling=GREEDY, **kw) -> ChatSession:
    return run_chat(lm, sampling, read=script(*lines), **kw)


def msgs(*pairs, system=None):
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": r, "content": c} for r, c in pairs]


def test_two_turns_keep_history(lm, calls, capsys):
    session = chat(lm, "hello", "and then?")
    first, second = calls
    a1 = first["done"].text
    assert first["ids"] == encode_messages(lm.tokenizer, msgs(("user", "hello")))
    assert second["ids"] == encode_messages(lm.tokenizer, msgs(("user", "hello"), ("assistant", a1),
                                                               ("user", "and then?")))  # fmt: skip
    assert "<|user|>hello" in lm.tokenizer.decode(second["ids"])  # the model's chat template
    held = first["ids"] + first["done"].token_ids[:-1]  # what the first answer computed
    common = next((i for i, (a, b) in enumerate(zip(held, second["ids"], strict=False)) if a != b), len(held))
    assert second["done"].stats.cached_prompt_tokens == common >= len(first["ids"]) - 1 > 0  # not again
    captured = capsys.readouterr()
    assert captured.out == a1 + "\n" + second["done"].text + "\n"  # answers on stdout, nothing else
    assert "6 tokens" in captured.err and "hit rate" in captured.err
    assert f"{common} of {len(second['ids'])} prompt tokens cached" in captured.err.splitlines()[-1]
    assert session.conversation.num_turns == 2


def test_reset_forgets_the_turns_not_the_system_prompt(lm, calls, capsys):
    chat(lm, "hello", "/reset", "again", system="be brief")
    assert calls[1]["ids"] == encode_messages(lm.tokenizer, msgs(("user", "again"), system="be brief"))
    assert "forgot 1 turn" in capsys.readouterr().err


def test_system_command(lm, calls, capsys):
    chat(lm, "/system you are terse", "hi", "/system", "/system none", "bye")
    assert calls[0]["ids"] == encode_messages(lm.tokenizer, msgs(("user", "hi"), system="you are terse"))
    assert "system prompt: you are terse" in capsys.readouterr().err  # stdout holds only answers
    assert lm.tokenizer.decode(calls[1]["ids"]).startswith("<|user|>hi")


def test_ctrl_c_inside_the_model_keeps_the_conversation(lm, calls, capsys):
    n_layers = len(lm.spec.moe_layers)
    count = {"n": 0}

    def hook(layer, hidden):
        count["n"] += 1
        if count["n"] == 3 * n_layers + 2:  # prefill, two decode steps, then mid-way through the third
            raise KeyboardInterrupt

    def arm():
        lm.runtime.hooks.append(hook)

    def disarm():
        lm.runtime.hooks.remove(hook)

    session = chat(lm, "first", arm, "second", disarm, "third")
    first, second, third = (c["done"] for c in calls)
    assert second.finish_reason == "interrupted" and len(second.token_ids) == 3
    assert third.finish_reason == "length"
    want = msgs(("user", "first"), ("assistant", first.text), ("user", "second"), ("assistant", second.text),
                ("user", "third"))  # fmt: skip
    assert calls[2]["ids"] == encode_messages(lm.tokenizer, want)
    assert "interrupted" in capsys.readouterr().err
    assert session.conversation.num_turns == 3


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_first_stops_after_the_token_second_at_once(lm, calls, capsys, presses):
    n_layers = len(lm.spec.moe_layers)
    count = {"n": 0}

    def hook(layer, hidden):  # Ctrl-C pressed while the second decode step runs
        count["n"] += 1
        if 2 * n_layers < count["n"] <= 2 * n_layers + presses:
            os.kill(os.getpid(), signal.SIGINT)

    handler = signal.getsignal(signal.SIGINT)
    session = chat(lm, lambda: lm.runtime.hooks.append(hook), "first", lm.runtime.hooks.clear, "second")
    first = session.conversation.turns[1]["content"]
    if presses == 1:  # the step finishes, its token is shown, then the loop stops
        assert calls[0]["tokens"] == 3 and calls[0]["done"] is None
    else:  # the step is abandoned inside the model
        assert calls[0]["tokens"] == 2 and calls[0]["done"].finish_reason == "interrupted"
    assert session.last.finish_reason == "length" and len(session.last.token_ids) == 6
    assert calls[1]["ids"] == encode_messages(lm.tokenizer, msgs(("user", "first"), ("assistant", first),
                                                                 ("user", "second")))  # fmt: skip
    assert "interrupted" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is handler


def test_ctrl_c_while_rendering_and_at_the_prompt(lm, monkeypatch, capsys):
    real = generation.stream_generate
    prompts = []

    def interrupted_after_two(lm_, ids, cfg, **kw):
        prompts.append(list(ids))
        events = real(lm_, ids, cfg, **kw)
        try:
            for i, ev in enumerate(events):
                if i == 2 and len(prompts) == 1:
                    raise KeyboardInterrupt  # as if Ctrl-C came while the token was being printed
                yield ev
        finally:
            events.close()

    monkeypatch.setattr(generation, "stream_generate", interrupted_after_two)
    session = chat(lm, "first", KeyboardInterrupt, "second")
    out = capsys.readouterr()
    partial = out.out.split("\n")[0]
    assert "interrupted" in out.err
    assert session.conversation.turns[:2] == msgs(("user", "first"), ("assistant", partial))
    assert prompts[1] == encode_messages(lm.tokenizer, msgs(("user", "first"), ("assistant", partial),
                                                            ("user", "second")))  # fmt: skip


def test_unknown_command_lists_the_commands(lm, calls, capsys):
    chat(lm, "/stast", "/st", "/help")
    captured = capsys.readouterr()
    err = captured.err
    assert "//text" in err and not captured.out  # /help says how to send a message starting with /
    assert "unknown command /stast (did you mean /stats?)" in err
    assert "unknown command /st (did you mean /stats?)" in err  # cut short, not the closest spelling (/set)
    for name in ("/help", "/stats", "/reset", "/system", "/set", "/quit"):
        assert name in err
    assert not calls


def test_set_changes_sampling_and_bad_values_are_one_line(lm, calls, capsys):
    session = chat(lm, "/set temperature 0.25", "/set top-p 0.5", "/set max-new-tokens 3", "/set seed 7",
                   "/set temperature hot", "/set top-p 2", "/set nope 1", "/set temperature", "hi")  # fmt: skip
    cfg = calls[0]["cfg"]
    assert (cfg.temperature, cfg.top_p, cfg.max_new_tokens, cfg.seed) == (0.25, 0.5, 3, 7)
    assert len(calls[0]["done"].token_ids) == 3
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: temperature must be a number from 0 (greedy) to 100, not 'hot'",
        "error: top-p must be a number in (0, 1], not '2'",
        "error: no setting 'nope': temperature, top-p, max-new-tokens, seed",
        "error: usage: /set NAME VALUE, e.g. /set temperature 0.2",
    ]
    assert session.sampling.temperature == 0.25


def test_stats_table_and_stats_json(lm, calls, capsys, tmp_path):
    path = tmp_path / "last.json"
    chat(lm, "hello", "again", "/stats", stats_json=path)
    captured = capsys.readouterr()
    assert "Expert cache since start" not in captured.out  # stdout holds only the answers
    table = captured.err[captured.err.index("Expert cache since start") :]
    rows = {line.split()[0]: line.split() for line in table.splitlines()[1:] if line[:1].isalnum()}
    assert set(lm.spec.moe_layers) == {int(k) for k in rows if k.isdigit()}
    total = lm.cache.stats.total()
    assert rows["total"][2:6] == [str(total.uses), str(total.hits), str(total.late), str(total.misses)]
    assert f"{total.hit_rate:.0%}" in rows["total"]
    data = json.loads(path.read_text())
    last = calls[-1]["done"]
    assert data["generated_tokens"] == len(last.token_ids) and data["prompt_tokens"] == len(calls[-1]["ids"])


def test_long_conversation_drops_oldest_turns(lm, calls, capsys, monkeypatch):
    monkeypatch.setattr(lm.plan, "context", 60)
    session = chat(lm, "one two three", "four five six", "seven eight nine", "ten", system="sys")
    for call in calls:
        assert len(call["ids"]) + call["cfg"].max_new_tokens <= 60
        assert lm.tokenizer.decode(call["ids"]).startswith("<|system|>sys")
    assert "dropped the" in capsys.readouterr().err
    turns = session.conversation.turns
    assert turns[0]["content"] != "one two three" and turns[-2]["content"] == "ten"
    assert calls[-1]["ids"] == encode_messages(lm.tokenizer, msgs(*[(m["role"], m["content"]) for m in turns[:-1]],
                                                                   system="sys"))  # fmt: skip


def test_message_too_long_for_the_context(lm, calls, capsys, monkeypatch):
    monkeypatch.setattr(lm.plan, "context", 40)
    session = chat(lm, "word " * 40, "hi")
    err = capsys.readouterr().err
    assert "error: the prompt is" in err and "hint:" in err
    assert [m["content"] for m in session.conversation.turns][0] == "hi"  # the long one was not kept


def test_chat_template_refusing_the_system_role(lm, calls, capsys, monkeypatch):
    strict = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    monkeypatch.setattr(lm.tokenizer, "chat_template", strict + TEMPLATE)
    session = chat(lm, "hi", "/system none", "hi again", system="be brief")
    err = capsys.readouterr().err.splitlines()
    assert "error: the model's chat template refused this conversation: System role not supported" in err
    assert any(line.startswith("hint: drop the system prompt (/system none)") for line in err)
    assert len(calls) == 1 and session.conversation.messages()[0] == {"role": "user", "content": "hi again"}


# -- the conversation, without a model ---------------------------------------------------


def words(messages) -> list[int]:
    """A fake tokenizer: one token per word, one per message."""
    return [0] * sum(1 + len(m["content"].split()) for m in messages)


def test_fit_drops_oldest_turns_and_keeps_the_system_prompt():
    conv = msgs(("user", "a b c"), ("assistant", "d e f"), ("user", "g h i"), ("assistant", "j k l"),
                ("user", "m n"), system="s")  # fmt: skip
    full = len(words(conv))  # 2 + 4*4 + 3 = 21
    fit = fit_to_context(conv, words, limit=full + 5, max_new_tokens=5)
    assert fit.dropped_turns == 0 and fit.messages == conv and fit.max_new_tokens == 5
    fit = fit_to_context(conv, words, limit=full + 4, max_new_tokens=5)
    assert fit.dropped_turns == 1 and fit.messages == [conv[0], *conv[3:]]
    assert fit.max_new_tokens == 5 and len(fit.prompt_ids) == full - 8
    fit = fit_to_context(conv, words, limit=12, max_new_tokens=5)
    assert fit.dropped_turns == 2 and fit.messages == [conv[0], conv[-1]]
    fit = fit_to_context(conv, words, limit=7, max_new_tokens=100)  # the answer gets what is left
    assert fit.messages == [conv[0], conv[-1]] and fit.max_new_tokens == 2
    with pytest.raises(PromptTooLongError, match="5 tokens; the context holds 5"):
        fit_to_context(conv, words, limit=5, max_new_tokens=5)


def test_a_prompt_too_long_says_how_far_the_context_can_grow():
    assert PromptTooLongError(50, 40, model_max=4096).hint.endswith(
        "a larger --context, up to 4096 (it costs KV-cache memory)"
    )
    assert "up to" not in PromptTooLongError(50, 40).hint  # the model does not say how far it attends
    assert PromptTooLongError(50, 4096, model_max=4096).hint == (
        "send a shorter message: 4096 tokens is all this model can attend to"
    )


def test_turns_dropped_leave_a_quarter_of_the_context_free_where_they_can():
    """Dropping just enough would drop a turn at every turn from then on, and each time the
    conversation would be computed again: enough go to leave a quarter of the context free."""
    turns = [(("user", "assistant")[i % 2], "w w w") for i in range(8)]  # 4 turns of 8 tokens
    conv = msgs(*turns, ("user", "m"))  # 32 + 2 tokens
    fit = fit_to_context(conv, words, limit=40, max_new_tokens=8)  # needs 42: one turn must go
    assert fit.dropped_turns == 2 and len(fit.prompt_ids) == 18  # 18 + 8 + 10 (a quarter) <= 40
    fit = fit_to_context(conv, words, limit=30, max_new_tokens=8)  # two would fit: 18 + 8 <= 30
    assert fit.dropped_turns == 3 and len(fit.prompt_ids) == 10  # 10 + 8 + 7 <= 30
    fit = fit_to_context(conv, words, limit=35, max_new_tokens=8)  # a quarter of 35, rounded down: 8
    assert fit.dropped_turns == 2 and len(fit.prompt_ids) == 18  # 18 + 8 + 8 <= 35; a third (11) is not
    long_last = msgs(*turns, ("user", "m " * 11))  # 32 + 12 tokens
    fit = fit_to_context(long_last, words, limit=40, max_new_tokens=20)  # a quarter free: not possible
    assert fit.dropped_turns == 3 and len(fit.prompt_ids) == 20  # so the fewest that fit: 20 + 20 <= 40


def test_fit_keeps_half_the_context_for_history_when_answers_are_long():
    conv = msgs(("user", "a"), ("assistant", "b"), ("user", "c"))
    fit = fit_to_context(conv, words, limit=20, max_new_tokens=1000)  # room kept: 10
    assert fit.dropped_turns == 0 and fit.max_new_tokens == 20 - 6


def test_conversation_turns():
    conv = Conversation("s")
    for text in ("a", "b", "c"):
        conv.ask(text)
        conv.answer(text.upper())
    conv.ask("d")
    assert conv.num_turns == 4
    fit = conv.prepare(words, limit=16, max_new_tokens=4)  # one must go; two leave a quarter free
    assert fit.dropped_turns == 2 and conv.messages() == msgs(("user", "c"), ("assistant", "C"), ("user", "d"),
                                                              system="s")  # fmt: skip
    conv.retract()  # the unanswered message goes; an answer that came is never taken back
    conv.retract()
    assert conv.messages() == msgs(("user", "c"), ("assistant", "C"), system="s")
    conv.reset()
    assert conv.messages() == msgs(system="s")
    assert split_turns(msgs(("assistant", "x"), ("user", "y"))) == (
        [],
        [msgs(("assistant", "x")), msgs(("user", "y"))],
    )


# -- input: keys, blocks, pipes ------------------------------------------------------------


def test_triple_quoted_blocks_in_pipes():
    read = line_reader(io.StringIO('"""first\nsecond\n"""\n"""one line"""\nplain\n'))
    assert unquote(read()) == "first\nsecond"
    assert unquote(read()) == "one line"
    assert read() == "plain"
    with pytest.raises(EOFError):
        read()


def test_pipe_blocks_opened_alone_left_open_and_crlf_lines():
    read = line_reader(io.StringIO('"""\nfirst\n"""\nwindows\r\n"""unclosed\nrest'))
    assert unquote(read()) == "first"  # quotes alone on their line open the block
    assert read() == "windows"  # a CRLF line ends without its \r
    assert unquote(read()) == "unclosed\nrest"  # the input ended inside the block: what came is sent
    with pytest.raises(EOFError):
        read()


def test_tab_completes_slash_commands_and_settings():
    from prompt_toolkit.document import Document
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    with create_pipe_input() as pipe:
        session = make_prompt_session({"/set": "change a setting", "/stats": "the cache", "/quit": "leave"},
                                      input=pipe, output=DummyOutput())  # fmt: skip

        def names(text):
            return [c.text for c in session.completer.get_completions(Document(text), None)]

        assert names("/s") == ["/set", "/stats"] and names("/ST") == ["/stats"]
        assert names("/set t") == ["temperature", "top-p"] and names("/set max") == ["max-new-tokens"]
        assert names("hello /s") == [] and names("/s\n") == [] and names("/stats x") == []


def test_prompt_keys_enter_sends_alt_enter_adds_a_line():
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    with create_pipe_input() as pipe:
        session = make_prompt_session(input=pipe, output=DummyOutput())
        pipe.send_text("hello\x1b\rworld\r")  # Esc Enter (what Alt+Enter sends), then Enter
        assert session.prompt() == "hello\nworld"
        pipe.send_text('"""a\rb"""\r')  # Enter inside an open triple-quoted block adds a line
        assert session.prompt() == '"""a\nb"""'
        pipe.send_text("x\ny\r")  # Ctrl-J
        assert session.prompt() == "x\ny"


def test_terminal_detection(monkeypatch):
    from promoe_cli import chat_input
    from promoe_cli.console import out

    class TTY(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(out, "_force_terminal", True)
    monkeypatch.setenv("TERM", "xterm-256color")
    assert chat_input.is_terminal(TTY())
    assert not chat_input.is_terminal(io.StringIO())
    monkeypatch.setenv("TERM", "dumb")
    assert not chat_input.is_terminal(TTY())


def test_piped_stdin_gives_plain_answers(tiny_model):
    path = tiny_model("mixtral")
    vram = budget_for_slots(path, "int8", 2)
    r = CliRunner().invoke(app, ["chat", str(path), "--quant", "int8", "--vram", str(vram), "-t", "0", "-n", "8",
                                 "--prefetch", "none"], input="hello\n/stats\n/quit\nnot sent\n")  # fmt: skip
    assert r.exit_code == 0, r.output
    lm = load_small(path, quant="int8", slots_per_layer=2)
    want = generate(lm, encode_messages(lm.tokenizer, msgs(("user", "hello"))),
                    SamplingConfig(max_new_tokens=8, temperature=0))  # fmt: skip
    lm.close()
    assert r.stdout == want.text + "\n"  # only the answer: what /stats shows goes to stderr
    assert "Expert cache since start" in r.stderr
    assert not ANSI.search(r.output)
    assert "tok/s" in r.stderr and "hit rate" in r.stderr


def test_jsonl_gives_one_line_per_message_with_its_answer_or_its_error(lm, calls, capsys, monkeypatch):
    """A script pairs each message with one JSON line, even for a message that was refused;
    answers hold newlines of their own, so plain text could not be split back."""
    monkeypatch.setattr(lm.plan, "context", 100)
    chat(lm, "hello", "/stats", "word " * 100, '"""two\nlines"""', jsonl=True)
    first, second = calls  # the long message never reached the model
    lines = capsys.readouterr().out.splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 3
    for rec, call in ((records[0], first), (records[2], second)):
        done = call["done"]
        assert rec["text"] == done.text and rec["token_ids"] == done.token_ids
        assert rec["finish_reason"] == done.finish_reason == "length"
        assert rec["stats"]["generated_tokens"] == len(done.token_ids) == 6
    assert [r["message"] for r in records] == ["hello", "word " * 100, "two\nlines"]
    assert "the context holds 100" in records[1]["error"] and records[1]["hint"]
    assert "text" not in records[1]
    assert second["ids"] == encode_messages(lm.tokenizer, msgs(("user", "hello"), ("assistant", first["done"].text),
                                                               ("user", "two\nlines")))  # fmt: skip


def test_jsonl_one_shot_prints_one_record(tiny_model):
    path = tiny_model("mixtral")
    vram = budget_for_slots(path, "int8", 2)
    r = CliRunner().invoke(app, ["chat", str(path), "--quant", "int8", "--vram", str(vram), "-t", "0", "-n", "8",
                                 "--prefetch", "none", "--no-chat-template", "--prompt", "def f(x):", "--jsonl"])  # fmt: skip
    assert r.exit_code == 0, r.output
    lm = load_small(path, quant="int8", slots_per_layer=2)
    want = generate(lm, lm.tokenizer.encode("def f(x):"), SamplingConfig(max_new_tokens=8, temperature=0))
    lm.close()
    (line,) = r.stdout.splitlines()
    rec = json.loads(line)
    assert rec["message"] == "def f(x):" and rec["text"] == want.text and rec["token_ids"] == want.token_ids
    assert rec["stats"]["prompt_tokens"] == len(lm.tokenizer.encode("def f(x):"))
    long = "word " * 5000  # past the bundled model's positions: refused, with a record saying so
    r = CliRunner().invoke(app, ["chat", str(path), "--quant", "int8", "--vram", str(vram), "--no-chat-template",
                                 "--prompt", long, "--jsonl"])  # fmt: skip
    assert r.exit_code == 2 and "error: the prompt is" in r.stderr
    (line,) = r.stdout.splitlines()
    assert json.loads(line)["error"].startswith("the prompt is") and json.loads(line)["message"] == long


# -- the live view -------------------------------------------------------------------------


def test_live_answer_commits_lines_and_wrapped_rows():
    text = "The quick brown fox jumps over the lazy dog and keeps running.\nShort.\n" + "word " * 30
    sink = io.StringIO()
    view = LiveAnswer(prompt_tokens=3, budget=None, console=Console(file=sink, width=24))
    with view:
        for i in range(0, len(text), 3):
            view.add(text[i : i + 3])
            assert "\n" not in view.pending and len(view.pending.rstrip()) <= 24
    lines = sink.getvalue().splitlines()
    assert all(len(line) <= 24 for line in lines)
    assert " ".join(" ".join(lines).split()) == " ".join(text.split())
    assert lines[0] == "The quick brown fox" and "Short." in lines


def test_status_line(lm):
    done = generate(lm, encode_messages(lm.tokenizer, msgs(("user", "hi"))), GREEDY)
    line = status_text(done.stats, prompt_tokens=5, elapsed=1.0, budget=lm.plan.budget).plain
    assert "6 tokens" in line and "tok/s" in line and "hit rate" in line and "memory" in line
    assert "reading 5 prompt tokens" in status_text(None, prompt_tokens=5, elapsed=1.0, budget=None).plain
    cached = status_text(None, prompt_tokens=50, cached_tokens=45, elapsed=1.0, budget=None).plain
    assert "reading 5 new prompt tokens (45 cached)" in cached


def test_the_status_line_counts_one_token_and_colours_the_hit_rate(lm):
    import dataclasses

    done = generate(lm, encode_messages(lm.tokenizer, msgs(("user", "hi"))), GREEDY)

    def line(**change):
        return status_text(
            dataclasses.replace(done.stats, **change), prompt_tokens=5, elapsed=1.0, budget=None
        )

    assert line(generated_tokens=1).plain.startswith("1 token · ")

    def hit_style(rate):
        text = line(hit_rate=rate)
        start = text.plain.index(f"hit rate {rate:.0%}") + len("hit rate ")
        return {str(span.style) for span in text.spans if span.start <= start < span.end} - {"dim"}

    assert hit_style(0.95) == {"good"} and hit_style(0.5) == {"warn"}


def test_model_text_loses_terminal_control_characters_but_keeps_its_layout():
    from promoe_cli.render import sanitize

    # ESC and the 8-bit CSI (\x9b) both start sequences a terminal obeys; BEL rings it
    assert sanitize("a\x1b[2Jb\x9b2Jc\x07d\x7f\te\nf") == "a[2Jb2Jcd\te\nf"


def test_the_status_line_fits_the_terminal(lm):
    """A status line that wraps leaves a stray row at each redraw: within the width, the
    Ctrl-C reminder goes first, then memory, then prefetch accuracy, then an ellipsis."""
    import dataclasses

    done = generate(lm, encode_messages(lm.tokenizer, msgs(("user", "hi"))), GREEDY)
    stats = dataclasses.replace(done.stats, prediction_precision=0.8)  # as with a predictor

    def line(width):
        return status_text(stats, prompt_tokens=5, elapsed=1.0, budget=lm.plan.budget, width=width).plain

    full = line(None)
    assert "prefetch 80%" in full and "memory" in full and "Ctrl-C stops" in full
    for width in (200, len(full), len(full) - 1, 60, 45, 20):
        assert len(line(width)) <= width, (width, line(width))
    assert line(len(full)) == full
    assert "Ctrl-C" not in line(len(full) - 1) and "memory" in line(len(full) - 1)
    memory = full[full.index(" · memory") : full.index(" · Ctrl-C")]
    shorter = line(len(full) - len(" · Ctrl-C stops") - len(memory))
    assert "memory" not in shorter and "prefetch" in shorter
    assert line(45).startswith("6 tokens") and "tok/s" in line(45) and "hit rate" in line(45)
    assert "prefetch" not in line(45) and line(20).endswith("…")


def test_the_live_view_says_when_it_is_stopping():
    import io

    from rich.console import Console

    sink = io.StringIO()
    view = LiveAnswer(prompt_tokens=3, budget=None, console=Console(file=sink, width=80, force_terminal=True))
    console = Console(file=io.StringIO(), width=80)
    assert "stopping" not in "".join(s.text for s in console.render(view))
    view.stopping()
    assert "stopping after this token" in "".join(s.text for s in console.render(view))


def test_an_answer_that_fills_the_context_says_so(lm, calls, capsys, monkeypatch):
    monkeypatch.setattr(lm.plan, "context", 40)
    chat(lm, "hi", sampling=SamplingConfig(max_new_tokens=500, temperature=0, ignore_eos=True))
    done = calls[0]["done"]
    assert done.finish_reason == "context" and len(calls[0]["ids"]) + len(done.token_ids) == 40
    assert calls[0]["cfg"].max_new_tokens == 40 - len(calls[0]["ids"])  # asked for the room left, not 500
    assert "the context is full at 40 tokens" in capsys.readouterr().err


def test_how_to_let_a_stopped_answer_go_on_is_said_once(lm, calls, capsys):
    chat(lm, "hi", "again", "more")  # each stops at GREEDY's 6 tokens
    lines = [line for line in capsys.readouterr().err.splitlines() if "stopped at 6 tokens" in line]
    assert len(lines) == 3
    assert ["/set max-new-tokens" in line for line in lines] == [True, False, False]


def test_stats_in_place_says_nothing_is_predicted(tiny_model, capsys):
    """On the CPU with no budget every expert is read in place: /stats must not claim a prefetcher."""
    from runtime.loader import LoadOptions, load_model

    lm = load_model(
        str(tiny_model("mixtral")), LoadOptions(quant="int8", device="cpu", predictor="cross-layer")
    )
    try:
        assert lm.plan.in_place
        chat(lm, "/stats")
        assert "prefetch none (experts read in place)" in capsys.readouterr().err
        from promoe_cli.loading import banner

        banner(lm, given={"--prefetch": "cross-layer"})  # asked for: said to go unused, not dropped
        assert "nothing can miss (--prefetch cross-layer unused)" in capsys.readouterr().err
        banner(lm)  # the default, not asked for: nothing said
        assert "nothing can miss" not in capsys.readouterr().err
    finally:
        lm.close()


def test_stats_and_banner_of_a_cache_that_holds_the_model_name_no_predictor(tiny_model, capsys):
    """With a slot for every expert the cache is filled at load and nothing is predicted:
    neither the banner nor /stats names a predictor or an eviction policy at work."""
    from promoe_cli.loading import banner
    from runtime.loader import LoadOptions, load_model

    lm = load_model(str(tiny_model("mixtral")), LoadOptions(quant="int8", device="cpu", predictor="cross-layer",
                                                            link_bandwidth=1e9))  # fmt: skip
    try:
        assert not lm.plan.in_place and lm.cache.num_slots == lm.spec.total_experts
        banner(lm, given={"--prefetch": "cross-layer"})
        chat(lm, "/stats")
        err = capsys.readouterr().err
        assert "all loaded" in err and "· prefetch cross-layer" not in err  # not claimed to run ...
        assert "nothing can miss (--prefetch cross-layer unused)" in err  # ... said to go unused
        assert "prefetch none (every expert loaded)" in err
    finally:
        lm.close()


def test_a_layer_with_no_uses_has_no_hit_rate():
    """/stats before any answer: '–', not a 0% hit rate that reads as every expert missing."""
    from rich.console import Console

    from promoe_cli.render import stats_table
    from runtime.stats import ExpertStats

    stats = ExpertStats()
    stats.layer(1).uses = stats.layer(1).hits = 4
    console = Console(width=200, record=True)
    console.print(stats_table(stats, {0: 2, 1: 2}))
    rows = {line.split()[0]: line.split() for line in console.export_text().splitlines() if line.strip()}
    assert rows["0"][6] == "–" and rows["1"][6] == "100%"


@pytest.mark.parametrize("block", ['""""""', '"""\n\n"""', '"""   """'])
def test_an_empty_quoted_block_sends_nothing(lm, calls, capsys, block):
    session = chat(lm, block, "hi")
    assert len(calls) == 1 and calls[0]["ids"] == encode_messages(lm.tokenizer, msgs(("user", "hi")))
    assert session.conversation.num_turns == 1
    assert "empty message, nothing sent" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "value", "want"),
    [
        ("Temperature", "0", ("temperature", 0.0)),  # names in any case, short or with _
        ("temp", "100", ("temperature", 100.0)),
        ("t", "1.5", ("temperature", 1.5)),
        ("TOP_P", "1", ("top_p", 1.0)),
        ("n", "1", ("max_new_tokens", 1)),
        ("max_tokens", "64", ("max_new_tokens", 64)),
        ("seed", "0", ("seed", 0)),
        ("seed", "NONE", ("seed", None)),
        ("seed", str(2**63 - 1), ("seed", 2**63 - 1)),
    ],
)
def test_set_accepts_each_setting_up_to_its_bounds(name, value, want):
    from promoe_cli.repl import _parse_setting

    assert _parse_setting(name, value) == want


@pytest.mark.parametrize(
    ("name", "value"),
    [("temperature", "100.5"), ("temperature", "-0.1"), ("top-p", "0"), ("max-new-tokens", "0"),
     ("max-new-tokens", "2.5"), ("seed", "-1"), ("seed", str(2**63)), ("seed", "nothing")],
)  # fmt: skip
def test_set_refuses_values_past_the_bounds(name, value):
    from promoe_cli.repl import SettingError, _parse_setting

    with pytest.raises(SettingError, match=f"must be .*, not '{re.escape(value)}'"):
        _parse_setting(name, value)


def test_commands_in_any_case_quoted_system_prompts_and_extra_words(lm, calls, capsys):
    """/RESET and /Exit are commands; /system takes a triple-quoted prompt without its quotes and
    'None' clears it; /set with three words is refused; //text sends '/text'."""
    session = chat(lm, '/system """be terse"""', "/System", "/system None", "/system", "/set seed 1 2",
                   "//etc", "/Stats", "/RESET", "/Exit", "never sent")  # fmt: skip
    err = capsys.readouterr().err
    assert "system prompt: be terse\n" in err and "system prompt: (none)" in err
    assert "error: usage: /set NAME VALUE" in err and "forgot 1 turn\n" in err
    assert "Expert cache since start · 1 answer · " in err
    assert len(calls) == 1 and lm.tokenizer.decode(calls[0]["ids"]).startswith("<|user|>/etc")
    assert session.conversation.system is None and session.answers == 1


def test_reset_says_the_system_prompt_stays_and_counts_turns(lm, calls, capsys):
    chat(lm, "hi", "again", "/reset", system="be brief")
    assert "forgot 2 turns (the system prompt stays)" in capsys.readouterr().err


def test_ctrl_c_before_the_first_token_or_while_encoding_unsends_the_message(lm, calls, capsys, monkeypatch):
    """Nothing written yet: the message is dropped, as if never sent, and the session goes on."""
    from runtime.conversation import Conversation

    def hook(layer, hidden):  # in the prefill, before any token
        raise KeyboardInterrupt

    real_prepare = Conversation.prepare
    pending = {"n": 0}

    def prepare(self, *args, **kw):
        if pending["n"]:
            pending["n"] -= 1
            raise KeyboardInterrupt  # Ctrl-C while the chat template runs
        return real_prepare(self, *args, **kw)

    monkeypatch.setattr(Conversation, "prepare", prepare)
    session = chat(lm, lambda: lm.runtime.hooks.append(hook), "lost in prefill", lm.runtime.hooks.clear,
                   lambda: pending.update(n=1), "lost while encoding", "kept")  # fmt: skip
    assert calls[0]["done"].finish_reason == "interrupted" and calls[0]["tokens"] == 0
    assert calls[-1]["ids"] == encode_messages(lm.tokenizer, msgs(("user", "kept")))
    assert session.conversation.num_turns == 1
    assert capsys.readouterr().err.count("interrupted") == 2


def test_help_lists_the_prompt_keys_only_for_a_person_at_the_prompt(lm, calls, capsys):
    """At a terminal the prompt's keys apply, --jsonl or not (its answers are records, its
    messages are still typed at the prompt); reading lines from a pipe, only //text does."""
    for live, jsonl, keys in ((True, False, True), (True, True, True), (False, False, False)):
        chat(lm, "/help", live=live, jsonl=jsonl)
        err = capsys.readouterr().err
        assert "//text" in err
        assert ("Ctrl-X Ctrl-E" in err) == keys and ("Up, Down, Ctrl-R" in err) == keys, (live, jsonl)


def test_jsonl_at_a_terminal_prints_records_not_the_live_view(lm, calls, capsys):
    """--jsonl at a terminal: stdout holds one record per message and stderr one summary
    line per answer, nothing of the live view (its status line, the blank line after it)."""
    chat(lm, "hello", "again", live=True, jsonl=True)
    captured = capsys.readouterr()
    assert [json.loads(line)["message"] for line in captured.out.splitlines()] == ["hello", "again"]
    lines = captured.err.splitlines()
    assert len(lines) == 2 and all("tok/s" in line for line in lines), lines


def test_stats_ends_with_the_last_answers_summary(lm, calls, capsys):
    chat(lm, "/stats")
    assert "last answer:" not in capsys.readouterr().err  # no answer yet
    chat(lm, "hello", "/stats")
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1] == "last answer: " + lines[0]  # the line said after the answer, again

    def hook(layer, hidden):  # Ctrl-C in the prefill: the message is unsent, and no answer
        raise KeyboardInterrupt

    chat(lm, "hi", lambda: lm.runtime.hooks.append(hook), "lost", lm.runtime.hooks.clear, "/stats")
    err = capsys.readouterr().err
    assert "Expert cache since start · 1 answer ·" in err
    last = err.splitlines()[-1]
    assert last.startswith("last answer: 0 tokens ·") and last.endswith("· interrupted")


def test_stats_after_an_answer_stopped_before_any_figure(lm, capsys, monkeypatch):
    """A second Ctrl-C that lands before the runtime's own handler: the answer ends with no
    figures at all, and /stats still shows the cache, with no last-answer line to make up."""

    def interrupted(*args, **kw):
        raise KeyboardInterrupt
        yield

    monkeypatch.setattr(generation, "stream_generate", interrupted)
    session = chat(lm, "lost", "/stats")
    err = capsys.readouterr().err
    assert session.last.stats is None and session.conversation.num_turns == 0
    assert "Expert cache since start · 0 answers ·" in err and "last answer:" not in err


def test_the_welcome_says_when_there_is_no_chat_template(lm, calls, capsys, monkeypatch):
    """At a terminal, a chat without a template (--no-chat-template, or a tokenizer that has
    none) says the conversation is continued as plain text; one with a template says nothing."""
    from promoe_cli.console import out

    class TTY(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(out, "_force_terminal", True)
    monkeypatch.setenv("TERM", "xterm-256color")

    def welcome(chat_template: bool) -> str:
        run_chat(lm, GREEDY, read=script(), stdin=TTY(), chat_template=chat_template, live=False)
        err = capsys.readouterr().err
        assert "Enter sends" in err
        return err

    assert "no chat template" not in welcome(True)
    assert "no chat template" in welcome(False)
    monkeypatch.setattr(lm.tokenizer, "chat_template", None)
    assert "no chat template" in welcome(True)
