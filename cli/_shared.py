"""Helpers shared by the model-facing commands (eval, sample, diagnose, tokenize)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.console import Console

from sar_cli import _complete
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input: printed as one red line, exit status 2."""
    from sar_core.adapter import CheckpointError
    from sar_core.data.code_cache import StaleCacheError
    from sar_core.evaluate.metrics import MissingWeightsError
    from sar_core.plugins import PluginError

    return (ValueError, FileNotFoundError, FileExistsError, CheckpointError, PluginError,
            MissingWeightsError, StaleCacheError, ImportError)


def fail(console: Optional[Console], exc: BaseException) -> None:
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
               tokenizer_only: bool = False, null_payloads: Optional[list[str]] = None,
               needs_null: bool = False):
    """Load a model. ``random_backbone`` (False / True) is the answer to "may the backbone be
    freshly initialised?": False requires ``--backbone``; True with no file says so once;
    None (commands that only use the tokenizer) loads whatever is given. ``overrides``:
    the ``--override KEY=VALUE`` strings (adapter config fields the files do not hold).
    ``tokenizer_only``: no backbone is built (``adapter.load_tokenizer``).
    ``null_payloads``: the ``--null-payload`` strings, given to the adapter; ``needs_null``
    (commands that guide): a family with encoder-derived null payloads must have them."""
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
        adapter = load_adapter(family, tokenizer, backbone, device=device, overrides=parse_overrides(overrides),
                               tokenizer_only=tokenizer_only)
    if null_payloads:
        from sar_core.data.payloads import null_payload_files, read_null_payloads

        adapter.set_null_payloads(read_null_payloads(null_payload_files(null_payloads)))
    if needs_null:
        for name, spec in adapter.condition_payloads.items():
            if spec.encoded_null:
                adapter.null_payload(name)  # a clear error now, not after the first batch
    return adapter


def condition_payloads(adapter, payloads: Optional[list[str]], text_features: Optional[Path]) -> Optional[dict]:
    """``--payload NAME=FILE`` / ``--text-features FILE`` -> {NAME: Padded} checked against
    what the adapter reads (one error line naming a missing / unexpected payload), or None
    when none are given."""
    from sar_core.data.payloads import payload_files, read_payloads

    files = payload_files(payloads, text_features)
    if not files:
        return None
    loaded = read_payloads(files)
    adapter.check_payloads(loaded, "--payload", "give one --payload NAME=FILE for each payload the family reads")
    return loaded


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


def _config_error(message: str) -> None:
    """A bad ``--config`` file: one ``error:`` line, exit status 2 (not click's usage box)."""
    fail(None, ValueError(message))


def _read_defaults(ctx: typer.Context, param, value: Optional[Path]) -> Optional[Path]:
    """``--config FILE``: a YAML / JSON mapping of this command's option names to values,
    used as defaults. Precedence: flag > SAR_* variable > config file > built-in default."""
    if value is None or ctx.resilient_parsing:
        return value
    import yaml

    if not Path(value).is_file():
        _config_error(f"--config {value}: config file not found")
    try:
        data = yaml.safe_load(Path(value).read_text()) or {}
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as exc:
        _config_error(f"--config {value}: cannot parse it: {' '.join(str(exc).split())}")
    if not isinstance(data, dict):
        _config_error(f"--config {value} must hold a mapping of option names to values")
    known = {p.name for p in ctx.command.params if p.name and p.name != "config"}
    values = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        _config_error(f"--config {value}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    ctx.default_map = {**(ctx.default_map or {}), **values}
    return value


CONFIG = typer.Option(None, "--config", "-c", is_eager=True, callback=_read_defaults, envvar="SAR_CONFIG",
                      rich_help_panel="Config", help="YAML file of option values (names as the flags, e.g. "
                      "tokenizer: vae.pth); flags and SAR_* variables win over it.")

FAMILY = typer.Option(..., "--family", "-f", envvar="SAR_FAMILY", rich_help_panel="Model",
                      autocompletion=_complete.names("adapter"),
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
PAYLOAD = typer.Option(None, "--payload", rich_help_panel="Conditions", metavar="NAME=FILE",
                       help="Condition payload NAME of every sample, repeatable (e.g. --payload clip_pooled=p.pt "
                       "--payload clip_tokens=t.pt): a .pt list of (n_i, D) tensors, {features: (N, N_max, D), "
                       "lengths: (N,)}, or an (N, D) tensor (one row each). Checked against what the family reads.")
TEXT_FEATURES = typer.Option(None, "--text-features", rich_help_panel="Conditions",
                             help="Shorthand for --payload text_features=FILE (Infinity's T5 features).")
NULL_PAYLOAD = typer.Option(None, "--null-payload", rich_help_panel="Conditions", metavar="NAME=FILE",
                            help="Encoder-derived null payload (features of the empty prompt) for families that "
                            "need one: NAME=FILE (an (n, D) tensor) or FILE (a dict name -> tensor, e.g. the "
                            "null_payloads.pt `sar encode-text` writes); repeatable.")
SCHEDULE = typer.Option(None, "--schedule", rich_help_panel="Model", autocompletion=_complete.names("schedule"),
                        help="Scale schedule, e.g. 1_2_3_4 (default: the model's).")
