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
    "[cyan]promoe stores rm tiny-code-moe-8366a8204067[/]  by the name the listing shows\n\n"
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
    if ctx.invoked_subcommand is not None:
        return
    with handle_errors():
        from runtime.resolve import promoe_home
        from runtime.store_catalog import list_stores

        home = promoe_home()
        models = list_stores(home)
        if as_json:
            out.print_json(json.dumps({"stores": str(home / "stores"), "models": [_json(m) for m in models]}))
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
        if dry_run:
            out.print(f"would remove {what} ({format_bytes(freed)})")
        else:
            out.print(f"removed {what} ({format_bytes(freed)} freed)")


def prune(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Say what would be removed; remove nothing.")
    ] = False,
) -> None:
    """Remove the stores whose checkpoint is gone, and what interrupted conversions left."""
    with handle_errors():
        from runtime.resolve import promoe_home
        from runtime.sizes import format_bytes
        from runtime.store_catalog import prune as prune_stores

        todo = prune_stores(promoe_home(), dry_run=dry_run)
        verb = "would remove" if dry_run else "removed"
        for m, size in todo:
            why = (
                f"its checkpoint {m.source} is gone"
                if m.orphaned
                else "leftovers of an interrupted conversion"
            )
            out.print(f"{verb} {m.name} ({format_bytes(size)}): {why}")
        total = format_bytes(sum(size for _, size in todo))
        out.print(f"{verb} nothing: every store's checkpoint is in place" if not todo else
                  f"{'would free' if dry_run else 'freed'} {total}")  # fmt: skip


def _find(home, target: str):
    from runtime.errors import ModelNotFoundError, UsageError
    from runtime.resolve import resolve_model
    from runtime.store_catalog import find

    found = find(home, target)
    if found is None:
        try:
            found = find(home, str(resolve_model(target).path))
        except ModelNotFoundError:
            found = None
    if found is None:
        raise UsageError(f"no stores of '{target}' in {home / 'stores'}",
                         hint="'promoe stores' lists them; a model whose folder is gone goes by its listed name")  # fmt: skip
    return found


def _json(m) -> dict:
    return {
        "name": m.name,
        "path": str(m.path),
        "checkpoint": None if m.source is None else str(m.source),
        "orphaned": m.orphaned,
        "bytes": m.nbytes,
        "formats": {f.quant: {"bytes": f.nbytes, "complete": f.complete} for f in m.formats},
        "predictor_bytes": m.predictor_bytes,
        "leftover_bytes": m.leftover_bytes,
        "converting": list(m.converting),
    }


def _render(models, home) -> None:
    from rich.table import Table

    from runtime.sizes import format_bytes

    if not models:
        err.print(f"no stores yet in {home / 'stores'}: the first chat with a model converts its experts")
        return
    table = Table(title=f"Expert stores in {home / 'stores'}", title_justify="left")
    for col in ("name", "checkpoint", "formats", "predictor", "size"):
        table.add_column(col, justify="right" if col == "size" else "left")
    for m in models:
        forms = ", ".join(f"{f.quant} {format_bytes(f.nbytes)}" + ("" if f.complete else " (incomplete)")
                          for f in m.formats) or "-"  # fmt: skip
        if m.converting:
            forms += f" (converting, process {m.converting[0]})"
        elif m.leftover_bytes:
            forms += f" (+{format_bytes(m.leftover_bytes)} left by an interrupted conversion)"
        source = "unknown" if m.source is None else str(m.source)
        if m.orphaned:
            source = f"[warn]{source} (gone)[/]"
        predictor = format_bytes(m.predictor_bytes) if m.predictor_bytes else "-"
        table.add_row(m.name, source, forms, predictor, format_bytes(m.nbytes))
    out.print(table)
    total = sum(m.nbytes for m in models)
    orphans = [m for m in models if m.orphaned]
    line = f"{len(models)} model(s), {format_bytes(total)}"
    if orphans:
        line += (f"; {len(orphans)} whose checkpoint is gone ({format_bytes(sum(m.nbytes for m in orphans))}):"
                 " promoe stores prune")  # fmt: skip
    err.print(line)
