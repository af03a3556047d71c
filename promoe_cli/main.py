"""The root of the ``promoe`` command: only wires the subcommands together."""

from __future__ import annotations

import typer

from promoe_cli.bench import EXAMPLES as BENCH_EXAMPLES
from promoe_cli.bench import bench
from promoe_cli.chat import EXAMPLES as CHAT_EXAMPLES
from promoe_cli.chat import chat
from promoe_cli.plan import EXAMPLES as PLAN_EXAMPLES
from promoe_cli.plan import plan
from promoe_cli.profile_device import EXAMPLES as PROFILE_EXAMPLES
from promoe_cli.profile_device import profile_device
from promoe_cli.train_predictor import EXAMPLES as TRAIN_EXAMPLES
from promoe_cli.train_predictor import train_predictor

app = typer.Typer(
    name="promoe",
    help="Run large Mixture-of-Experts models on small GPUs: quantized experts in host memory, "
    "a predicted, prefetched expert cache on the device.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command(no_args_is_help=False, epilog=CHAT_EXAMPLES)(chat)
app.command("train-predictor", epilog=TRAIN_EXAMPLES)(train_predictor)
app.command(no_args_is_help=False, epilog=PLAN_EXAMPLES)(plan)
app.command("profile-device", epilog=PROFILE_EXAMPLES)(profile_device)
app.command(no_args_is_help=False, epilog=BENCH_EXAMPLES)(bench)


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


if __name__ == "__main__":
    app()
