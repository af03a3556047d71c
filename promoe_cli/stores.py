"""``promoe stores``: the converted expert stores on disk; remove one, or prune orphans."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from promoe_cli.console import err, out
from promoe_cli.errors import handle_errors

EXAMPLES = (
    "[bold]Examples[/]\n\n"
    "[cyan]promoe stores[/]  every model's stores: formats, sizes, the checkpoint each came from\n\n"
    "[cyan]promoe stores rm mixtral --quant int8[/]  free the disk of Mixtral's int8 store\n\n"
    "[cyan]promoe stores rm tiny-code-moe-<hash>[/]  by the name the listing shows (the hash is of the "
    "checkpoint's path)\n\n"
    "[cyan]promoe stores prune --dry-run[/]  what pruning would remove\n\n"
    "A removed store is converted again the next time it is needed."
)


def stores(
    ctx: typer.Context,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the listing as JSON (bytes) on stdout.")
    ] = False,
) -> None:
    """List the expert stores promoe converted (in $PROMOE_HOME/stores), with their sizes."""
    with handle_errors():
        if ctx.invoked_subcommand is not None:
            if as_json:
                from runtime.errors import UsageError

                raise UsageError("--json goes with the listing (promoe stores --json)",
                                 hint=f"promoe stores {ctx.invoked_subcommand} --help lists its options")  # fmt: skip
            return
        from runtime.resolve import promoe_home
        from runtime.store_catalog import list_stores, root_leftovers

        home = promoe_home()
        models = list_stores(home)
        if as_json:
            out.print_json(json.dumps({"stores": str(home / "stores"), "models": [_json(m) for m in models],
                                       "leftover_bytes": root_leftovers(home)}))  # fmt: skip
        else:
            _render(models, home)


def remove(
    model: Annotated[
        str,
        typer.Argument(
            metavar="MODEL",
            help="A name from the listing, or the model as given to chat (a folder, repo id or alias).",
            show_default=False,
        ),
    ],
    quant: Annotated[
        str | None,
        typer.Option(
            "--quant", "-q", metavar="FORMAT", help="Remove only this format's store. \\[default: all]"
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Say what would be removed; remove nothing.")
    ] = False,
) -> None:
    """Remove a model's expert stores (and its learned predictor), or one format's store."""
    with handle_errors():
        from runtime.resolve import promoe_home
        from runtime.sizes import format_bytes
        from runtime.store_catalog import remove as remove_store

        home = promoe_home()
        found = _find(home, model)
        what = found.name if quant is None else f"{found.name}/{quant}"
        freed = remove_store(found, quant, dry_run=dry_run)
        out.print(f"would remove {what} ({format_bytes(freed)})" if dry_run else
                  f"removed {what} ({format_bytes(freed)} freed)")  # fmt: skip
        if quant is None and found.predictor_bytes:
            err.print(f"{'this would remove' if dry_run else 'this removed'} its learned predictor too; "
                      "promoe train-predictor makes a new one (stores are converted again by themselves)")  # fmt: skip


def prune(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Say what would be removed; remove nothing.")
    ] = False,
) -> None:
    """Remove the stores whose checkpoint is gone, and what interrupted conversions and removals left."""
    with handle_errors():
        from runtime.resolve import promoe_home
        from runtime.sizes import format_bytes
        from runtime.store_catalog import prune as prune_stores

        todo = prune_stores(promoe_home(), dry_run=dry_run)
        verb = "would remove" if dry_run else "removed"
        for p in todo:
            out.print(f"{verb} {p.name} ({format_bytes(p.nbytes)}): {p.reason}")
        if not todo:
            out.print(f"{verb} nothing: no store's checkpoint is gone, and nothing was left behind")
        else:
            out.print(f"{'would free' if dry_run else 'freed'} {format_bytes(sum(p.nbytes for p in todo))}")


def _find(home, target: str):
    from runtime.errors import ModelNotFoundError, UsageError
    from runtime.resolve import resolve_model
    from runtime.store_catalog import find

    if not target.strip():
        raise UsageError("name the model whose stores to remove", hint="'promoe stores' lists them by name")
    found = find(home, target)
    if found is None:
        try:
            found = find(home, str(resolve_model(target).path))
        except ModelNotFoundError:
            found = None
    if found is None:  # the listed name without its hash (tiny-code-moe), when it names one model
        from runtime.store_catalog import list_stores

        named = [m for m in list_stores(home) if m.name.rsplit("-", 1)[0] == target]
        if len(named) > 1:
            raise UsageError(f"'{target}' names {len(named)} models' stores: {', '.join(m.name for m in named)}",
                             hint="give the listed name of the one to remove")  # fmt: skip
        found = named[0] if named else None
    if found is None:
        raise UsageError(f"no stores of '{target}' in {home / 'stores'}",
                         hint="'promoe stores' lists them; a model whose folder is gone goes by its listed name")  # fmt: skip
    return found


def _json(m) -> dict:
    return {
        "name": m.name,
        "path": str(m.path),
        "checkpoint": None if m.source is None else str(m.source),
        "checkpoint_state": m.checkpoint,
        "bytes": m.nbytes,
        "formats": {f.quant: {"bytes": f.nbytes, "complete": f.complete} for f in m.formats},
        "predictor_bytes": m.predictor_bytes,
        "predictor_damage": m.predictor_damage,
        "leftover_bytes": m.leftover_bytes,
        "busy": [
            {"store": what, "kind": "converting" if kind == "tmp" else "removing", "pid": pid}
            for what, kind, pid in m.busy
        ],
    }


#: columns the table needs beside the name (what `stores rm` takes: whole, on one line) for
#: its other cells to stay readable; a narrower terminal gets one block of lines per model
TABLE_ROOM = 64


def _render(models, home) -> None:
    from rich.markup import escape
    from rich.table import Table

    from runtime.sizes import format_bytes
    from runtime.store_catalog import root_leftovers

    stray = root_leftovers(home)
    if not models and not stray:
        err.print(f"no stores yet in {home / 'stores'}: the first chat with a model converts its experts")
        return
    title = f"Expert stores in {home / 'stores'}"
    if not models or max(len(m.name) for m in models) + TABLE_ROOM <= out.width:
        table = Table(title=title, title_justify="left")
        for col in ("name", "checkpoint", "formats", "predictor", "size"):
            # a long path (every HF cache one) wraps rather than losing its end
            table.add_column(col, justify="right" if col == "size" else "left",
                             overflow="fold" if col in ("checkpoint", "formats") else "ellipsis",
                             no_wrap=col == "name")  # fmt: skip
        for m in models:
            source, forms, predictor = _row(m)
            table.add_row(escape(m.name), source, escape(forms), predictor, format_bytes(m.nbytes))
        out.print(table)
    else:  # too narrow for the table: the name on a line of its own, then what it holds
        out.print(title)
        for m in models:
            source, forms, predictor = _row(m)
            out.print(f"\n[bold]{escape(m.name)}[/]  {format_bytes(m.nbytes)}")
            out.print(f"  checkpoint: {source}\n  formats: {escape(forms)}\n  predictor: {predictor}")
        out.print()
    line = f"{len(models)} model{'' if len(models) == 1 else 's'}, {format_bytes(sum(m.nbytes for m in models) + stray)}"
    gone = [m for m in models if m.checkpoint == "gone"]
    if gone:
        line += f"; {len(gone)} whose checkpoint is gone ({format_bytes(sum(m.nbytes for m in gone))})"
    if stray:
        line += f"; {format_bytes(stray)} left by a removal cut short"
    if gone or stray or any(m.leftover_bytes for m in models):
        line += ": promoe stores prune"
    out.print(line)  # with the table: `promoe stores > file` keeps the total
    if any(m.predictor_damage for m in models):
        err.print("a damaged learned predictor is refused when loaded: promoe train-predictor MODEL "
                  "trains it again (promoe stores rm NAME removes it with the stores)")  # fmt: skip


def _row(m) -> tuple[str, str, str]:
    """A model's checkpoint (rich markup), formats (plain text) and predictor (markup)."""
    from rich.markup import escape

    from runtime.sizes import format_bytes

    forms = ", ".join(f"{f.quant} {format_bytes(f.nbytes)}" + ("" if f.complete else " (incomplete)")
                      for f in m.formats) or "-"  # fmt: skip
    for what, kind, pid in m.busy:
        forms += f" ({what}: {'converting' if kind == 'tmp' else 'being removed'}, process {pid})"
    if m.leftover_bytes:
        forms += f" (+{format_bytes(m.leftover_bytes)} left by an interrupted conversion or removal)"
    source = escape("unknown" if m.source is None else str(m.source))
    if m.checkpoint == "gone":  # the state first: it is what the row is about
        source = f"[warn]gone:[/] [warn]{source}[/]"
    elif m.checkpoint == "unknown" and m.source is not None:
        source = f"not reachable: {source}"
    predictor = format_bytes(m.predictor_bytes) if m.predictor_bytes else "-"
    if m.predictor_damage:
        predictor += f" [warn](damaged: {escape(m.predictor_damage)})[/]"
    return source, forms, predictor
