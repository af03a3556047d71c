"""``promoe chat``: one-shot completion for scripts, or the interactive chat."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from promoe_cli import options as o
from promoe_cli.console import err, out
from promoe_cli.errors import handle_errors

EXAMPLES = (
    "[bold]Examples[/]\n\n"
    "[cyan]promoe chat[/]  the bundled tiny model, interactive\n\n"
    "[cyan]promoe chat mixtral --vram 6GB[/]  Mixtral-8x7B from your Hugging Face cache on a 6 GB GPU\n\n"
    '[cyan]promoe chat --prompt "def fibonacci(n):" -n 64 -t 0[/]  one greedy completion on stdout\n\n'
    "[cyan]promoe chat ./my-olmoe --quant int8 --stats-json run.json --prompt Hello[/]  figures as JSON\n\n"
    "[cyan]promoe chat --jsonl < questions.txt > answers.jsonl[/]  one message per line in, one JSON line out"
)


def _check_seed(value: int | None) -> int | None:
    """The seed's range, checked here rather than with ``min``/``max``, which would print
    9223372036854775807 in the help."""
    from runtime.generate import SEED_LIMIT

    if value is not None and not 0 <= value < SEED_LIMIT:
        raise typer.BadParameter("a seed is a whole number from 0 to 2^63-1")
    return value


def chat(
    ctx: typer.Context,
    model: o.ModelArg = None,
    prompt: Annotated[
        str | None,
        typer.Option(
            "--prompt", metavar="TEXT", help="Complete this prompt, print only the completion, exit."
        ),
    ] = None,
    max_new_tokens: Annotated[
        int,
        typer.Option(
            "--max-new-tokens", "-n", metavar="N", min=1, help="Most tokens to generate per answer."
        ),
    ] = 256,
    temperature: Annotated[
        float,
        typer.Option("--temperature", "-t", metavar="T", min=0.0, max=100.0, help="0 for greedy decoding."),
    ] = 0.7,
    top_p: Annotated[
        float,
        typer.Option("--top-p", metavar="P", help="Nucleus sampling mass, more than 0 and at most 1."),
    ] = 0.95,
    seed: Annotated[
        int | None,
        typer.Option(
            "--seed",
            metavar="S",
            callback=_check_seed,
            help="Sampling seed (0 to 2^63-1), for reproducible runs.",
        ),
    ] = None,
    no_chat_template: Annotated[
        bool, typer.Option("--no-chat-template", help="Feed the text as is, no chat template.")
    ] = False,
    system: Annotated[
        str | None,
        typer.Option("--system", metavar="TEXT", help="System prompt (models whose template has one)."),
    ] = None,
    stats_json: Annotated[
        Path | None,
        typer.Option("--stats-json", metavar="PATH", help="Write the run's figures to this JSON file."),
    ] = None,
    jsonl: Annotated[
        bool,
        typer.Option(
            "--jsonl",
            help="Write each answer as one JSON line on stdout (message, answer, why it stopped, "
            "figures), not streamed: for scripts. A message refused gets a line with its error.",
        ),
    ] = False,
    trace_out: o.TraceOut = None,
    quant: o.Quant = "int4",
    vram: o.Vram = None,
    profile: o.Profile = None,
    context: o.Context = None,
    device: o.Device = "auto",
    dtype: o.Dtype = None,
    policy: o.Policy = "lru",
    slot_split: o.SlotSplit = "uniform",
    prefetch: o.Prefetch = "cross-layer",
    link_bandwidth: o.LinkBandwidth = None,
    link_latency: o.LinkLatency = None,
    low_bit: o.LowBit = None,
    low_bit_threshold: o.LowBitThreshold = 0.3,
    host_misses: o.HostMisses = False,
) -> None:
    """Chat with a Mixture-of-Experts model whose experts do not fit on the device."""
    with handle_errors():
        from promoe_cli.loading import banner, load, load_options, miss_options_given, offline_environment
        from runtime.errors import UsageError

        if not 0 < top_p <= 1:  # checked here: typer's range can show only one bound, x<=1.0
            raise UsageError(
                f"--top-p {top_p:g} is outside (0, 1]: it must be more than 0 and at most 1",
                hint="0.95 is usual; for greedy decoding use -t 0",
            )
        if prompt is not None and not prompt.strip():  # before loading: there is nothing to complete
            raise UsageError(
                "--prompt is empty: there is no text to complete",
                hint='give it some, e.g. --prompt "def fibonacci(n):", or leave --prompt out to chat',
            )
        from promoe_cli.loading import check_output_file

        for path, flag in ((stats_json, "--stats-json"), (trace_out, "--trace-out")):
            check_output_file(path, flag)  # before loading and generating, not after

        opts = load_options(quant=quant, vram=vram, profile=profile, context=context, device=device, dtype=dtype,
                            policy=policy, slot_split=slot_split, prefetch=prefetch, link_bandwidth=link_bandwidth,
                            link_latency=link_latency, trace=trace_out is not None, low_bit=low_bit,
                            low_bit_threshold=low_bit_threshold, host_misses=host_misses)  # fmt: skip
        offline_environment()
        from runtime.generate import SamplingConfig

        sampling = SamplingConfig(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed
        )
        lm = load(model, opts)
        try:
            trace = _open_trace(trace_out)
            try:
                if prompt is not None:
                    from promoe_cli.loading import unused_options

                    idle = unused_options(lm, miss_options_given(ctx))
                    if idle:  # a script is told too: no banner says it
                        err.print(f"[warn]note:[/] every expert is resident, nothing can miss: {idle} unused")
                    _one_shot(lm, prompt, sampling, not no_chat_template, system, stats_json, trace, jsonl)
                else:
                    banner(lm, profile=profile, given=miss_options_given(ctx))
                    from promoe_cli.repl import run_chat

                    run_chat(lm, sampling, system=system, chat_template=not no_chat_template, trace=trace,
                             stats_json=stats_json, jsonl=jsonl)  # fmt: skip
            finally:
                if trace is not None:
                    trace.close()
        finally:
            lm.close()


def _open_trace(path: Path | None):
    if path is None:
        return None
    from runtime.trace import TraceWriter

    return TraceWriter(path)


def _one_shot(lm, prompt: str, sampling, chat_template: bool, system, stats_json: Path | None, trace,
              jsonl: bool = False) -> None:  # fmt: skip
    """Print only the completion on stdout, streamed (with ``jsonl``: one JSON line at the
    end); figures go to --stats-json."""
    from runtime.errors import PromoeError
    from runtime.generate import DoneEvent, encode_prompt, stream_generate

    done = None
    try:
        ids = encode_prompt(lm.tokenizer, prompt, chat_template=chat_template, system=system)
        for ev in stream_generate(lm, ids, sampling, trace=trace):
            if isinstance(ev, DoneEvent):
                done = ev
            elif ev.text and not jsonl:
                out.print(ev.text, end="", markup=False, highlight=False)
                out.file.flush()
    except PromoeError as exc:  # refused (too long, the chat template): the record says so too
        if jsonl:
            write_jsonl(prompt, error=exc)
        raise
    if jsonl:
        write_jsonl(prompt, done)
    else:
        out.print(markup=False)
    if stats_json is not None:
        write_stats(stats_json, lm, done)
    if done.finish_reason == "interrupted":  # Ctrl-C: a script must tell a cut-off completion
        err.print("[warn]interrupted[/]")
        sys.exit(130)
    if done.finish_reason == "context":  # stopped short of --max-new-tokens: say why (exit 0: it is whole)
        from runtime.conversation import model_positions

        full, own = done.stats.prompt_tokens + done.stats.generated_tokens, model_positions(lm)
        why = (f"a longer --context lets it go on, up to the model's {own} positions" if own and full < own
               else "the model attends to no more")  # fmt: skip
        err.print(f"[warn]the context is full at {full} tokens: the completion stops there[/] ({why})")


def write_jsonl(message: str, done=None, error: BaseException | None = None) -> None:
    """One answer (or the error that refused its message) as one JSON line on stdout."""
    if error is not None:
        record = {"message": message, "error": str(error), "hint": getattr(error, "hint", "") or None}
    else:
        record = {"message": message, "text": done.text, "finish_reason": done.finish_reason,
                  "token_ids": done.token_ids, "stats": done.stats.to_json() if done.stats else None}  # fmt: skip
    out.file.write(json.dumps(record, ensure_ascii=False) + "\n")
    out.file.flush()


def write_stats(path: Path, lm, done) -> None:
    data = {
        "model": lm.name,
        "model_path": str(lm.resolved.path),
        "architecture": lm.spec.arch.model_type,
        "quant": lm.options.quant,
        "device": str(lm.device),
        "finish_reason": done.finish_reason,
        **done.stats.to_json(),
        "cache_experts_total": lm.spec.total_experts,
        "store_action": lm.store_report.action,
        "load_seconds": round(lm.timings["total_s"], 3),
    }
    path.write_text(json.dumps(data, indent=2) + "\n")
