"""``sar``: the command-line entry point. Commands live in one module each."""

from __future__ import annotations

import typer

from sar_cli import conformance_cmd, plugins_cmd
from sar_cli import diagnose_cmd, eval_cmd, sample_cmd, tokenize_cmd
from sar_cli import train_cmd
from sar_cli import compare_cmd, demo_cmd, encode_text_cmd, pretrain_cmd, study_cmd

app = typer.Typer(
    name="sar",
    help="Self-Autoregressive Refinement (SAR) post-training for scale-wise autoregressive image models.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_show_locals=False,
)


def _version_callback(value: bool) -> None:
    if value:
        from sar_core import __version__

        typer.echo(f"sar {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Self-Autoregressive Refinement (SAR) post-training for scale-wise AR image models."""


plugins_cmd.add_to(app)
conformance_cmd.add_to(app)
demo_cmd.add_to(app)
pretrain_cmd.add_to(app)
study_cmd.add_to(app)
compare_cmd.add_to(app)
sample_cmd.add_to(app)
eval_cmd.add_to(app)
tokenize_cmd.add_to(app)
diagnose_cmd.add_to(app)
encode_text_cmd.add_to(app)
train_cmd.add_to(app)
study_cmd.add_to(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
