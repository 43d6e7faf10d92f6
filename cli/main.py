"""``sar``: the command-line entry point. Commands live in one module each.

Commands load lazily: ``sar --help`` and shell completion of command names import none of
them, and ``sar CMD ...`` imports only ``CMD``'s module, whose heavy imports (torch, the
models) sit inside the command function. So help and completion never import torch
(tested in tests/test_cli_fast.py; timed by benchmarks/cli_startup.py).
"""

from __future__ import annotations

import importlib

import typer
from typer.core import TyperCommand, TyperGroup

#: command -> (module in sar_cli, one-line help shown by `sar --help` and completion)
COMMANDS = {
    "plugins": ("plugins_cmd", "List everything plugins registered, with each plugin's package, version and hooks."),
    "conformance": ("conformance_cmd", "Check an adapter against a golden case recorded by the upstream code."),
    "demo": ("demo_cmd", "The demo study on the shipped VAR miniature: TF vs SAR, paired seeds, a report."),
    "pretrain": ("pretrain_cmd", "Fit a tokenizer and teacher-force a fresh backbone (small models)."),
    "study": ("study_cmd", "Families x arms x seeds from one start each, and the report of paired differences."),
    "compare": ("compare_cmd", "Paired differences of every eval / diagnose metric between models, with noise."),
    "sample": ("sample_cmd", "Sample class- or text-conditional images into a grid and / or a folder."),
    "eval": ("eval_cmd", "FID / IS / KID / precision / recall / class accuracy of samples against a reference."),
    "tokenize": ("tokenize_cmd", "Encode a dataset split once into a code cache training can read."),
    "diagnose": ("diagnose_cmd", "Per-scale exposure gap: loss on the model's own inputs vs ground truth."),
    "encode-text": ("encode_text_cmd", "Captions -> condition payloads with a local T5 or CLIP text encoder."),
    "train": ("train_cmd", "Post-train with SAR (or plain teacher forcing: --rollout none)."),
    "plan": ("plan_cmd", "Memory per GPU, FLOPs, largest micro-batch and GPU hours of a train command (fake tensors)."),
    "export-checkpoint": ("export_cmd", "A run checkpoint's model (sharded FSDP2 ones too) as backbone.pth."),
}


def load_command(name: str):
    """The real click command of ``name``: its module imported, its Typer command built."""
    module_name, short_help = COMMANDS[name]
    module = importlib.import_module(f"sar_cli.{module_name}")
    sub = typer.Typer(rich_markup_mode="rich", add_completion=False, pretty_exceptions_show_locals=False)
    module.add_to(sub)
    command = typer.main.get_command(sub)
    command.name, command.short_help = name, short_help
    return command


class LazyGroup(TyperGroup):
    """Lists commands from :data:`COMMANDS` (stubs with their one-line help) and imports a
    command's module only when that command is resolved (run, its --help, its completion)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for name, (_, short_help) in COMMANDS.items():
            self.commands.setdefault(name, TyperCommand(name, help=short_help, short_help=short_help))
        self._loaded: set[str] = set()

    def list_commands(self, ctx) -> list[str]:
        return list(COMMANDS)

    def resolve_command(self, ctx, args):
        if args and args[0] in COMMANDS and args[0] not in self._loaded:
            self.commands[args[0]] = load_command(args[0])
            self._loaded.add(args[0])
        return super().resolve_command(ctx, args)


app = typer.Typer(
    name="sar",
    cls=LazyGroup,
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
