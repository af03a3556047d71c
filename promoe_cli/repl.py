"""The chat loop, separate from the command so tests can drive it with scripted input."""

from __future__ import annotations

import sys

from promoe_cli.console import err, out


def run_chat(
    lm, sampling, *, system=None, chat_template=True, trace=None, stats_json=None, stdin=None
) -> None:
    """Read a line, answer it, repeat; the conversation is kept and re-encoded each turn."""
    from runtime.generate import DoneEvent, encode_messages, stream_generate

    stdin = stdin or sys.stdin
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    for line in stdin:
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.strip() in ("/quit", "/exit"):
            break
        messages.append({"role": "user", "content": text})
        ids = encode_messages(lm.tokenizer, messages, chat_template)
        done = None
        for ev in stream_generate(lm, ids, sampling, trace=trace):
            if isinstance(ev, DoneEvent):
                done = ev
            elif ev.text:
                out.print(ev.text, end="", markup=False)
                out.file.flush()
        out.print(markup=False)
        messages.append({"role": "assistant", "content": done.text})
        s = done.stats
        err.print(
            f"[dim]{s.generated_tokens} tokens · {s.decode_tokens_per_s:.1f} tok/s · hit rate {s.hit_rate:.0%}[/]"
        )
