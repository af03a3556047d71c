"""The root of the ``promoe`` command: only wires the subcommands together."""

from __future__ import annotations

import sys

import typer
import typer.core

from promoe_cli.bench import EXAMPLES as BENCH_EXAMPLES
from promoe_cli.bench import bench
from promoe_cli.chat import EXAMPLES as CHAT_EXAMPLES
from promoe_cli.chat import chat
from promoe_cli.plan import EXAMPLES as PLAN_EXAMPLES
from promoe_cli.plan import plan
from promoe_cli.profile_device import EXAMPLES as PROFILE_EXAMPLES
from promoe_cli.profile_device import profile_device
from promoe_cli.stores import EXAMPLES as STORES_EXAMPLES
from promoe_cli.stores import prune, remove, stores
from promoe_cli.train_predictor import EXAMPLES as TRAIN_EXAMPLES
from promoe_cli.train_predictor import train_predictor


def _untyped_flags(params: list) -> list:
    """Typer 0.2x labels every option with its type, a flag too (``--json <bool>``), which
    reads as if the flag took a value: a flag gets no label. Each option's own ``metavar``
    (``N``, ``SIZE``) labels the rest."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class _Command(typer.core.TyperCommand):
    def get_params(self, ctx):
        return _untyped_flags(super().get_params(ctx))


class _Group(typer.core.TyperGroup):
    def get_params(self, ctx):
        return _untyped_flags(super().get_params(ctx))


app = typer.Typer(
    name="promoe",
    cls=_Group,
    help="Run large Mixture-of-Experts models on small GPUs: quantized experts in host memory, "
    "a predicted, prefetched expert cache on the device.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command(no_args_is_help=False, epilog=CHAT_EXAMPLES, cls=_Command)(chat)
app.command("train-predictor", epilog=TRAIN_EXAMPLES, cls=_Command)(train_predictor)
app.command(no_args_is_help=False, epilog=PLAN_EXAMPLES, cls=_Command)(plan)
app.command("profile-device", epilog=PROFILE_EXAMPLES, cls=_Command)(profile_device)
app.command(no_args_is_help=False, epilog=BENCH_EXAMPLES, cls=_Command)(bench)
stores_app = typer.Typer(cls=_Group, rich_markup_mode="rich")
stores_app.callback(invoke_without_command=True, epilog=STORES_EXAMPLES)(stores)
stores_app.command("rm", epilog=STORES_EXAMPLES, cls=_Command)(remove)
stores_app.command("prune", epilog=STORES_EXAMPLES, cls=_Command)(prune)
app.add_typer(stores_app, name="stores")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"promoe {version('promoe')}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Run large Mixture-of-Experts models on small GPUs.

    Set PROMOE_HOME to move promoe's directory (expert stores, profiles, history; default
    ~/.cache/promoe) and PROMOE_DEBUG=1 to see tracebacks.
    """


def run() -> None:
    """The ``promoe`` command: the app, with a usage error of the command line (a value out
    of range, an unknown option) reported as every other error is, one line and a hint on
    stderr, instead of the boxed panel Typer draws."""
    usage, abort = _click_exceptions()
    try:
        code = app(standalone_mode=False, prog_name="promoe")
    except usage as exc:
        code = _usage_error(exc)
    except abort:  # Ctrl-C or end of input while the command line is read
        code = 130
    if code == 130:  # Ctrl-C outside a command's own handling (typer 0.2x returns 130 for it)
        from promoe_cli.console import err

        err.print("[warn]interrupted[/]")
    sys.exit(code if isinstance(code, int) else 0)


def _click_exceptions() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """click's usage-error and abort classes: those of Typer's vendored click (typer 0.2x)
    and of click itself where it is installed (older typer raises those)."""
    usage: list[type[BaseException]] = []
    abort: list[type[BaseException]] = []
    if hasattr(typer, "TyperException"):
        usage.append(typer.TyperException)
    abort.append(typer.Abort)
    try:
        import click
    except ImportError:
        pass
    else:
        usage.append(click.ClickException)
        abort.append(click.exceptions.Abort)
    return tuple(usage), tuple(abort)


def _usage_error(exc) -> int:
    from rich.markup import escape

    from promoe_cli.console import err

    if type(exc).__name__ == "NoArgsIsHelpError":  # bare ``promoe``: the help was printed
        return exc.exit_code
    ctx = getattr(exc, "ctx", None)
    command = ctx.command_path if ctx is not None else "promoe"
    err.print(f"[error]error:[/] {escape(_plain_range(' '.join(exc.format_message().split())))}")
    what = (
        "commands"
        if exc.format_message().startswith("No such command")
        else "options, their ranges and examples"
    )
    err.print(f"[hint]hint:[/] {escape(command)} --help lists the {what}")
    return exc.exit_code


#: typer's range messages, in the words promoe's own errors use
_RANGE_WORDS = (
    (r"Input should be greater than or equal to (\S+)", r"it must be \1 or more"),
    (r"Input should be less than or equal to (\S+)", r"it must be \1 or less"),
    (r"Input should be greater than (\S+)", r"it must be more than \1"),
    (r"Input should be less than (\S+)", r"it must be less than \1"),
)


def _plain_range(message: str) -> str:
    """'...: Input should be greater than or equal to 1' -> '...: it must be 1 or more'."""
    import re

    for pattern, words in _RANGE_WORDS:
        message = re.sub(pattern, words, message)
    return message


if __name__ == "__main__":
    run()
