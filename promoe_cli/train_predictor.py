"""``promoe train-predictor``: learn per-layer expert predictors from your own prompts (ProMoE)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from promoe_cli import options as o
from promoe_cli.console import err, out
from promoe_cli.errors import handle_errors

EXAMPLES = (
    "[bold]Examples[/]\n\n"
    "[cyan]promoe train-predictor --prompts my_prompts.txt[/]  the bundled model, your prompts\n\n"
    "[cyan]promoe train-predictor mixtral --prompts chats.txt --lookahead 3 --vram 6GB[/]\n\n"
    "Then chat with [cyan]--prefetch learned[/]. Prompts: one per paragraph (blank-line separated), "
    "or one per line if the file has no blank lines. Without --prompts, promoe's own Python sources "
    "serve as a demonstration corpus."
)


MIN_TOKENS = 64


def read_prompts(path: Path | None) -> list[str]:
    from runtime.errors import UsageError

    if path is None:
        root = Path(__file__).resolve().parents[1]
        return [p.read_text() for p in sorted((root / "runtime").glob("*.py"))]
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "not found"
        raise UsageError(f"prompts file {path} {what}", hint="pass a text file with one prompt per paragraph")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"prompts file {path} is not UTF-8 text", hint="pass a plain text file") from None
    parts = [p.strip() for p in text.split("\n\n")] if "\n\n" in text else text.splitlines()
    prompts = [p for p in parts if p.strip()]
    if not prompts:
        raise UsageError(f"prompts file {path} is empty", hint="put at least a few prompts in it")
    return prompts


def train_predictor(
    model: o.ModelArg = None,
    prompts: Annotated[
        Path | None,
        typer.Option("--prompts", metavar="FILE", help="Text file of prompts to record routing on."),
    ] = None,
    max_prompt_tokens: Annotated[
        int, typer.Option("--max-prompt-tokens", metavar="N", min=8, help="Cut longer prompts.")
    ] = 256,
    new_tokens: Annotated[
        int,
        typer.Option(
            "--new-tokens", metavar="N", min=0, help="Greedy tokens generated per prompt, recorded too."
        ),
    ] = 32,
    lookahead: Annotated[
        int,
        typer.Option("--lookahead", metavar="N", min=1, max=8, help="How many MoE layers ahead to predict."),
    ] = 2,
    epochs: Annotated[
        int, typer.Option("--epochs", metavar="N", min=1, help="Training epochs per layer.")
    ] = 30,
    width: Annotated[
        int, typer.Option("--width", metavar="N", min=8, help="Hidden width of each layer's predictor MLP.")
    ] = 128,
    no_chat_template: Annotated[
        bool, typer.Option("--no-chat-template", help="Record prompts as raw text.")
    ] = False,
    quant: o.Quant = "int4",
    vram: o.Vram = None,
    profile: o.Profile = None,
    context: o.Context = None,
    device: o.Device = "auto",
    dtype: o.Dtype = None,
) -> None:
    """Learn which experts the next layers will need, from routing recorded on your prompts."""
    with handle_errors():
        from promoe_cli.loading import load, load_options, offline_environment

        opts = load_options(quant=quant, vram=vram, profile=profile, context=context, device=device, dtype=dtype,
                            policy="lru", slot_split="uniform", prefetch="none", link_bandwidth=None,
                            link_latency=None)  # fmt: skip
        texts = read_prompts(prompts)
        offline_environment()
        from runtime.conversation import context_limit, model_positions
        from runtime.errors import UsageError
        from runtime.generate import encode_prompt
        from runtime.memory_plan import plan_load
        from runtime.predictor import (
            predictor_dir,
            prompt_room,
            record_routing,
            save_predictors,
            train_predictors,
        )

        # refused before anything is converted or loaded, by the loader's plan from config.json
        planned = plan_load(model, opts)
        prompt_room(
            planned.plan.context, new_tokens, getattr(planned.spec.config, "max_position_embeddings", None)
        )
        lm = load(model, opts)
        try:
            most = len(lm.spec.moe_layers) - 1
            if lookahead > most:
                raise UsageError(f"--lookahead {lookahead} looks past the last layer: this model has "
                                 f"{most + 1} MoE layers", hint=f"use --lookahead {max(most, 1)} or less")  # fmt: skip
            chat = not no_chat_template and prompts is not None
            cut = min(max_prompt_tokens, prompt_room(context_limit(lm), new_tokens, model_positions(lm)))
            ids = [encode_prompt(lm.tokenizer, t, chat_template=chat)[:cut] for t in texts]
            with _progress() as progress:
                data = record_routing(lm, ids, new_tokens=new_tokens, progress=progress)
                if data.num_tokens < MIN_TOKENS:  # the saved predictor would replace a better one
                    raise UsageError(f"only {data.num_tokens} tokens were recorded; a predictor needs at least "
                                     f"{MIN_TOKENS} to learn from (and to hold some out)",
                                     hint="give more or longer prompts, or more --new-tokens")  # fmt: skip
                spec = lm.spec
                nets, meta = train_predictors(data, spec.moe_layers, spec.num_experts, spec.top_k, lookahead=lookahead,
                                              width=width, epochs=epochs, progress=progress)  # fmt: skip
            path = save_predictors(nets, meta, predictor_dir(lm.store.path), {"model": str(lm.resolved.path)})
        finally:
            lm.close()
        _report(meta, path, spec.top_k)


def _progress():
    from promoe_cli.loading import progress_display

    return progress_display(True)


def _report(meta: dict, path: Path, top_k: int) -> None:
    from rich.table import Table

    table = Table(title=f"Validation recall@{top_k} ({meta['validation_tokens']} held-out tokens)")
    table.add_column("layer", justify="right")
    for a in range(1, meta["lookahead"] + 1):
        table.add_column(f"+{a} layer{'s' if a > 1 else ''}", justify="right")
    for layer, rec in meta["validation"].items():
        cells = [
            f"{rec[k]:.3f}" if (k := f"recall@{top_k}_+{a}") in rec else "-"
            for a in range(1, meta["lookahead"] + 1)
        ]
        table.add_row(layer, *cells)
    out.print(table)
    err.print(f"[good]saved[/] {path}  ({meta['tokens']} tokens recorded, trained in {meta['train_seconds']:.1f}s); "
              "use it with [accent]--prefetch learned[/]")  # fmt: skip
