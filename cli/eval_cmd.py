"""``sar eval``: sample a model class-balanced and measure FID / IS / KID / PR / class accuracy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from sar_cli._shared import BACKBONE, DEVICE, FAMILY, SCHEDULE, TOKENIZER, fail, load_model, progress_bar, user_errors

ROWS = (("fid", "FID"), ("isc_mean", "IS"), ("isc_std", "IS std"), ("kid_mean", "KID"), ("kid_std", "KID std"),
        ("precision", "precision"), ("recall", "recall"), ("f_score", "F-score"),
        ("class_accuracy", "class accuracy"), ("num_generated", "samples"), ("num_reference", "reference images"))


def print_report(console: Console, report: dict, title: str = "sar eval") -> None:
    table = Table(title=f"{title}: {report.get('family', '?')} ({report.get('feature_extractor', '?')} features)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, name in ROWS:
        if key in report:
            v = report[key]
            table.add_row(name, f"{v:.4g}" if isinstance(v, float) else str(v))
    console.print(table)
    for note in report.get("notes", []):
        console.print(f"[yellow]note:[/] {note}", highlight=False)


def evaluate(
    family: str = FAMILY,
    tokenizer: Path = TOKENIZER,
    backbone: Optional[Path] = BACKBONE,
    reference: Optional[str] = typer.Option(None, "--reference",
                                            help="Reference images: a registered dataset name or a folder."),
    reference_split: str = typer.Option("val", "--reference-split", help="Split of a reference dataset."),
    reference_stats: Optional[Path] = typer.Option(None, "--reference-stats",
                                                   help="ADM-style .npz with mu / sigma for FID."),
    num_samples: int = typer.Option(1000, "--num-samples", "-n", help="Images to sample (class-balanced)."),
    text_features: Optional[Path] = typer.Option(
        None, "--text-features", help="Condition the samples on these text features (families without "
        "classes): a .pt list of (n_i, D) tensors or {features, lengths}; cycled to --num-samples."),
    cfg: float = typer.Option(1.5, "--cfg"),
    top_k: int = typer.Option(0, "--top-k"),
    top_p: float = typer.Option(0.0, "--top-p"),
    seed: int = typer.Option(0, "--seed"),
    batch_size: int = typer.Option(32, "--batch-size"),
    schedule: Optional[str] = SCHEDULE,
    feature_extractor: str = typer.Option("digit-classifier", "--feature-extractor",
                                          help="digit-classifier | inception | efficientnet-lite0 | a plugin's."),
    inception_weights: Optional[Path] = typer.Option(None, "--inception-weights",
                                                     help="Local Inception-v3 weights (torch-fidelity's file)."),
    weights: Optional[Path] = typer.Option(None, "--feature-weights", help="Weights of another feature extractor."),
    metrics: str = typer.Option("fid,isc,kid,prc", "--metrics", help="Comma list of fid, isc, kid, prc."),
    samples_folder: Optional[Path] = typer.Option(None, "--samples-folder", help="Also write every sample as PNG."),
    samples_npz: Optional[Path] = typer.Option(None, "--samples-npz", help="Also write samples as ADM's arr_0 .npz."),
    save_reference_stats: Optional[Path] = typer.Option(
        None, "--save-reference-stats", help="Also save the reference set's FID mu / sigma (.npz) for reuse."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the report as JSON here."),
    device: str = DEVICE,
) -> None:
    """Sample N images class-balanced (or conditioned on --text-features) from the model and
    compare them with a reference set through torch-fidelity. Nothing is downloaded:
    Inception needs --inception-weights."""
    from sar_core.checkpoint_io import atomic_write_text
    from sar_core.evaluation import (
        evaluate_adapter, get_feature_extractor, reference_set, reference_statistics, save_statistics,
    )

    console = Console()
    try:
        if num_samples < 2:
            raise ValueError(f"--num-samples must be >= 2, got {num_samples}")
        # resolve the extractor first: a missing weights file fails before any sampling
        fe_weights = inception_weights if feature_extractor == "inception" else weights
        extractor = get_feature_extractor(feature_extractor, fe_weights)
        adapter = load_model(console, family, tokenizer, backbone, device)
        conditions = None
        if text_features is not None:
            from sar_core.checkpoint_io import load_file

            conditions = {"text_features": load_file(text_features, what="text features")}
        with progress_bar(console, "sampling", num_samples) as advance:
            report = evaluate_adapter(
                adapter, num_samples=num_samples, extractor=extractor, reference=reference,
                reference_split=reference_split, reference_stats=reference_stats,
                metrics=[m.strip() for m in metrics.split(",") if m.strip()], cfg=cfg, top_k=top_k,
                top_p=top_p, seed=seed, batch_size=batch_size, schedule=schedule,
                samples_folder=samples_folder, samples_npz=samples_npz, progress=advance,
                conditions=conditions)
        if save_reference_stats is not None:
            if reference is None:
                raise ValueError("--save-reference-stats needs --reference")
            size = tuple(report["image_size"])
            stats = reference_statistics(reference_set(reference, reference_split, size), extractor,
                                         adapter.device, batch_size)
            save_statistics(stats, save_reference_stats)
            console.print(f"wrote reference statistics to {save_reference_stats}")
    except user_errors() as exc:
        fail(console, exc)
    report.update({"tokenizer": str(tokenizer), "backbone": str(backbone) if backbone else None})
    print_report(console, report)
    if out is not None:
        atomic_write_text(json.dumps(report, indent=2), out)
        console.print(f"wrote {out}")


def add_to(app: typer.Typer) -> None:
    app.command("eval")(evaluate)
