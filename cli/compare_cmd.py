"""``sar compare A B [C ...]``: paired differences of every eval / diagnose metric with their noise."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from sar_cli._shared import CONFIG, DEVICE, OVERRIDE, fail, parse_overrides, user_errors


def compare(
    models: list[str] = typer.Argument(..., help="Two or more models, the reference first: sar train run "
                                       "folders, folders holding backbone.pth (e.g. a shipped miniature) or "
                                       "backbone files."),
    config: Optional[Path] = CONFIG,
    family: Optional[str] = typer.Option(None, "--family", "-f", envvar="SAR_FAMILY", rich_help_panel="Model",
                                         help="Model family (default: from the first run folder among the models)."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", envvar="SAR_TOKENIZER", rich_help_panel="Model",
                                             help="Tokenizer checkpoint (default: the model folder's tokenizer.pth "
                                             "or the first run folder's)."),
    override: Optional[list[str]] = OVERRIDE,
    data: Optional[str] = typer.Option(None, "--data", rich_help_panel="Data", envvar="SAR_DATA",
                                       help="Validation data of the exposure gap / val loss (and the default "
                                       "reference): dataset name, NAME:FOLDER or image folder (default: the "
                                       "first run folder's training data)."),
    split: str = typer.Option("val", "--split", rich_help_panel="Data", help="Split of --data."),
    val_images: int = typer.Option(500, "--val-images", rich_help_panel="Data",
                                   help="First N validation images (0: all)."),
    reference: Optional[str] = typer.Option(None, "--reference", rich_help_panel="Data",
                                            help="Reference images of FID / precision / recall for class-"
                                            "conditional models (default: the validation images). Models without "
                                            "classes are always sampled on the validation captions and compared "
                                            "with those images."),
    reference_split: str = typer.Option("val", "--reference-split", rich_help_panel="Data",
                                        help="Split of --reference."),
    samples_per_class: int = typer.Option(20, "--samples-per-class", rich_help_panel="Sampling",
                                          help="Samples per class under every seed (class-conditional models)."),
    text_samples: Optional[int] = typer.Option(None, "--text-samples", rich_help_panel="Sampling",
                                               help="Samples per seed of models without classes (one per "
                                               "validation caption, cycled; default: one per validation image)."),
    seeds: str = typer.Option("1000-1004", "--seeds", rich_help_panel="Sampling",
                              help="Sampling seeds, the same for every model: '1000,1001,1002' or '1000-1004' "
                              "(at least 2: the noise of sampled metrics is their spread over seeds)."),
    cfg: float = typer.Option(1.5, "--cfg", rich_help_panel="Sampling", help="Classifier-free guidance scale."),
    top_k: int = typer.Option(0, "--top-k", rich_help_panel="Sampling", help="Top-k sampling (0: off)."),
    top_p: float = typer.Option(0.0, "--top-p", rich_help_panel="Sampling", help="Top-p sampling (0: off)."),
    feature_extractor: str = typer.Option("inception", "--feature-extractor", rich_help_panel="Metrics",
                                          help="inception | digit-classifier (the digits miniatures) | "
                                          "efficientnet-lite0 | a plugin's."),
    weights: Optional[Path] = typer.Option(None, "--feature-weights", "--inception-weights",
                                           rich_help_panel="Metrics", envvar="SAR_FEATURE_WEIGHTS",
                                           help="Local weights of the feature extractor."),
    metrics: str = typer.Option("fid,isc,prc", "--metrics", rich_help_panel="Metrics",
                                help="Comma list of fid, isc, kid, prc (kid: 100 subsets per seed, slow)."),
    batch_size: int = typer.Option(250, "--batch-size", rich_help_panel="Run", help="Sampling / pass batch size."),
    grid_per_class: int = typer.Option(2, "--grid-rows", rich_help_panel="Output",
                                       help="Rows of every model's sample grid."),
    maps: bool = typer.Option(True, "--maps/--no-maps", rich_help_panel="Output",
                              help="Per-scale difference maps of every model (from the exposure-gap passes)."),
    out: Path = typer.Option(Path("sar-compare"), "--out", "-o", rich_help_panel="Output",
                             help="Folder of compare.md, compare.json, grids.png, maps.png."),
    device: str = DEVICE,
    threads: int = typer.Option(0, "--threads", rich_help_panel="Run", help="torch CPU threads (0: torch's default)."),
) -> None:
    """Evaluate every model alike (the metrics of `sar eval` under the same sampling seeds and
    labels, those of `sar diagnose` on the same validation images) and print, per metric,
    each model's value ± its noise and the paired difference to the first model with its
    95% interval; better / worse only where that interval excludes 0. Writes compare.md,
    compare.json, grids.png and maps.png.

    Example: [bold]sar train -f var --tokenizer plugins/assets/minis/var/tokenizer.pth --backbone
    plugins/assets/minis/var/backbone.pth --set model.overrides.patch_nums=[1,2,3,4,6,8] --data digits-aug
    --steps 40 --lr 2e-5 --gamma 0.5 --out runs/var-sar40; sar compare plugins/assets/minis/var runs/var-sar40
    --feature-extractor digit-classifier[/]"""
    import torch

    from sar_core.study.compare import compare as run_compare
    from sar_core.study.compare import parse_seeds, resolve_models
    from sar_core.study.config import EvalSpec

    console = Console()
    if threads:
        torch.set_num_threads(threads)
    try:
        specs = resolve_models(list(models), family, tokenizer, parse_overrides(override))
        spec = EvalSpec(samples_per_class=samples_per_class, text_samples=text_samples, cfg=cfg, top_k=top_k,
                        top_p=top_p, feature_extractor=feature_extractor, extractor_weights=weights,
                        reference=reference, reference_split=reference_split,
                        metrics=[m.strip() for m in metrics.split(",") if m.strip()], batch_size=batch_size,
                        grid_per_class=grid_per_class, maps=maps)
        result = run_compare(specs, spec, seeds=parse_seeds(seeds), data=data, split=split, val_images=val_images,
                             out=out, device=device, log=lambda m: console.print(m, highlight=False))
    except user_errors() as exc:
        fail(console, exc)
    print_result(console, result)
    console.print(f"wrote {out / 'compare.md'} (also compare.json, grids.png, maps.png) in {result['wall_s']} s",
                  highlight=False)


def print_result(console: Console, result: dict) -> None:
    from rich.table import Table

    from sar_core.study.compare_report import NOISE, RULE, describe, scale_table, table

    header, rows = table(result)
    t = Table(title=f"sar compare: paired differences to {result['reference']}", caption=f"{NOISE}; {RULE}")
    _columns(t, header)
    for r in rows:
        t.add_row(*r)
    console.print(t)
    for m in result["models"][1:]:
        header, rows = scale_table(result, m["name"])
        st = Table(title=f"per-scale exposure gap: {m['name']} - {result['reference']}")
        _columns(st, header)
        for r in rows:
            st.add_row(*r)
        console.print(st)
    console.print(describe(result), highlight=False)


def _columns(table, header: list[str]) -> None:
    """Cells fold instead of being cut to '…' (narrow terminals, logs); verdicts stay whole."""
    for h in header:
        word = "verdict" in h and "[" not in h
        table.add_column(h, overflow="fold", no_wrap=word, min_width=12 if word else None)


def add_to(app: typer.Typer) -> None:
    app.command("compare")(compare)
