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
    from sar_core.data.code_cache import StaleCacheError
    from sar_core.evaluate.metrics import MissingWeightsError
    from sar_core.plugins import PluginError

    return (ValueError, FileNotFoundError, FileExistsError, CheckpointError, PluginError,
            MissingWeightsError, StaleCacheError, ImportError)


def fail(console: Console, exc: BaseException) -> None:
    """One line on stderr (never wrapped), exit status 2."""
    from rich.markup import escape

    err = Console(stderr=True, soft_wrap=True)
    err.print(f"[bold red]error:[/] {escape(' '.join(str(exc).split()))}", highlight=False)
    raise typer.Exit(2)


def parse_overrides(pairs: Optional[list[str]]) -> Optional[dict]:
    """``--override KEY=VALUE`` pairs -> {KEY: YAML value} (None when there are none)."""
    import yaml

    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--override wants KEY=VALUE (e.g. patch_nums=[1,2,3,4,6,8]), got {pair!r}")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ValueError(f"--override {key.strip()}: {value!r} is not a YAML value ({exc})") from None
    return out or None


def load_model(console: Console, family: str, tokenizer: str, backbone: Optional[str], device: str,
               random_backbone: Optional[bool] = None, overrides: Optional[list[str]] = None,
               tokenizer_only: bool = False):
    """Load a model. ``random_backbone`` (False / True) is the answer to "may the backbone be
    freshly initialised?": False requires ``--backbone``; True with no file says so once;
    None (commands that only use the tokenizer) loads whatever is given. ``overrides``:
    the ``--override KEY=VALUE`` strings (adapter config fields the files do not hold).
    ``tokenizer_only``: no backbone is built (``adapter.load_tokenizer``)."""
    from sar_core.evaluate.generation import load_adapter

    if random_backbone is False and backbone is None:
        raise ValueError("--backbone FILE is required: without it the model would be randomly "
                         "initialised (pass --random-backbone if that is what you want)")
    if random_backbone and backbone is not None:
        raise ValueError("pass either --backbone FILE or --random-backbone, not both")
    if random_backbone:
        console.print("[yellow]warning:[/] --random-backbone: using a freshly initialised, untrained "
                      "backbone; its outputs are noise", highlight=False)
    with console.status(f"loading {family} from {tokenizer}" + (f" + {backbone}" if backbone else "")):
        return load_adapter(family, tokenizer, backbone, device=device, overrides=parse_overrides(overrides),
                            tokenizer_only=tokenizer_only)


@contextmanager
def progress_bar(console: Console, description: str, total: int) -> Iterator:
    """A rich progress bar; yields ``advance(n)``."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as prog:
        task = prog.add_task(description, total=total)
        yield lambda n: prog.advance(task, n)


@contextmanager
def pass_progress(console: Console) -> Iterator:
    """One rich progress bar per pass; yields ``start(description, total) -> advance(n)``.
    Outside a terminal each finished pass is one line with its elapsed time."""
    import time

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    t0 = [time.monotonic()]
    with Progress(*columns, console=console, transient=False) as prog:
        def start(description: str, total: int):
            task = prog.add_task(description, total=total)
            t0[0] = time.monotonic()

            def advance(n: int) -> None:
                prog.advance(task, n)
                done = prog.tasks[task].completed
                if not console.is_terminal and done >= total:
                    console.print(f"{description}: {done}/{total} in {time.monotonic() - t0[0]:.1f}s",
                                  highlight=False)
            return advance
        yield start


def _read_defaults(ctx: typer.Context, param, value: Optional[Path]) -> Optional[Path]:
    """``--config FILE``: a YAML / JSON mapping of this command's option names to values,
    used as defaults. Precedence: flag > SAR_* variable > config file > built-in default."""
    if value is None or ctx.resilient_parsing:
        return value
    import yaml

    if not Path(value).is_file():
        raise typer.BadParameter(f"config file not found: {value}")
    try:
        data = yaml.safe_load(Path(value).read_text()) or {}
    except yaml.YAMLError as exc:
        raise typer.BadParameter(f"cannot parse {value}: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise typer.BadParameter(f"{value} must hold a mapping of option names to values")
    known = {p.name for p in ctx.command.params if p.name and p.name != "config"}
    values = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise typer.BadParameter(f"{value}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    ctx.default_map = {**(ctx.default_map or {}), **values}
    return value


CONFIG = typer.Option(None, "--config", "-c", is_eager=True, callback=_read_defaults, envvar="SAR_CONFIG",
                      rich_help_panel="Config", help="YAML file of option values (names as the flags, e.g. "
                      "tokenizer: vae.pth); flags and SAR_* variables win over it.")

FAMILY = typer.Option(..., "--family", "-f", envvar="SAR_FAMILY", rich_help_panel="Model",
                      help="Model family (see `sar plugins`), e.g. var, flexvar.")
TOKENIZER = typer.Option(..., "--tokenizer", envvar="SAR_TOKENIZER", rich_help_panel="Model",
                         help="Tokenizer checkpoint (upstream layout, .safetensors, or "
                              "hf://OWNER/REPO/FILE[@REVISION] from the Hugging Face cache / Hub).")
BACKBONE = typer.Option(None, "--backbone", envvar="SAR_BACKBONE", rich_help_panel="Model",
                        help="Backbone checkpoint (as --tokenizer); required unless --random-backbone.")
OVERRIDE = typer.Option(None, "--override", rich_help_panel="Model", metavar="KEY=VALUE",
                        help="Adapter config field the checkpoint files do not hold, as YAML, repeatable "
                        "(e.g. --override patch_nums=[1,2,3,4,6,8]; see each miniature's README).")
RANDOM_BACKBONE = typer.Option(False, "--random-backbone",
                               help="Use a freshly initialised backbone on purpose (smoke tests; outputs are noise).",
                               rich_help_panel="Model")
DEVICE = typer.Option("auto", "--device", envvar="SAR_DEVICE", rich_help_panel="Run",
                      help="cpu, cuda, cuda:1 ... (auto: cuda if available).")
# the sampler's knobs, the same for every command that samples
CFG = typer.Option(1.5, "--cfg", rich_help_panel="Sampling", help="Classifier-free guidance scale.")
TOP_K = typer.Option(0, "--top-k", rich_help_panel="Sampling", help="Top-k sampling (0: off).")
TOP_P = typer.Option(0.0, "--top-p", rich_help_panel="Sampling", help="Top-p sampling (0: off).")
SCHEDULE = typer.Option(None, "--schedule", rich_help_panel="Model",
                        help="Scale schedule, e.g. 1_2_3_4 (default: the model's).")
