"""Helpers shared by the model-facing commands (eval, sample, diagnose, tokenize)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input: printed as one red line, exit status 2."""
    from sar_core.adapter import CheckpointError
    from sar_core.code_cache import StaleCacheError
    from sar_core.evaluation import MissingWeightsError
    from sar_core.plugins import PluginError

    return (ValueError, FileNotFoundError, FileExistsError, CheckpointError, PluginError,
            MissingWeightsError, StaleCacheError, ImportError)


def fail(console: Console, exc: BaseException) -> None:
    console.print(f"[bold red]error:[/] {exc}", highlight=False)
    raise typer.Exit(2)


def load_model(console: Console, family: str, tokenizer: Path, backbone: Optional[Path], device: str):
    from sar_core.generation import load_adapter

    with console.status(f"loading {family} from {tokenizer}" + (f" + {backbone}" if backbone else "")):
        return load_adapter(family, tokenizer, backbone, device=device)


@contextmanager
def progress_bar(console: Console, description: str, total: int) -> Iterator:
    """A rich progress bar; yields ``advance(n)``."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as prog:
        task = prog.add_task(description, total=total)
        yield lambda n: prog.advance(task, n)


FAMILY = typer.Option(..., "--family", "-f", help="Model family (see `sar plugins`), e.g. var, flexvar.")
TOKENIZER = typer.Option(..., "--tokenizer", help="Tokenizer checkpoint (upstream layout).")
BACKBONE = typer.Option(None, "--backbone", help="Backbone checkpoint (upstream layout).")
DEVICE = typer.Option("auto", "--device", help="cpu, cuda, cuda:1 ... (auto: cuda if available).")
SCHEDULE = typer.Option(None, "--schedule", help="Scale schedule, e.g. 1_2_3_4 (default: the model's).")
