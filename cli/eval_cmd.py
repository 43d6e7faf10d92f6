"""``sar eval``: sample a model class-balanced and measure FID / IS / KID / PR / class accuracy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from sar_cli import _complete
from sar_cli._shared import (
    NULL_PAYLOAD, OVERRIDE, PAYLOAD, TEXT_FEATURES,
    BACKBONE, CFG, CONFIG, RANDOM_BACKBONE, DEVICE, FAMILY, TOP_K, TOP_P,
    SCHEDULE, TOKENIZER, condition_payloads, fail, load_model, pass_progress, user_errors,
)
from sar_cli._outputs import writable_file, writable_folder, write_failed, writing

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


def _written(exc: OSError, folder: Optional[Path], npz: Optional[Path]) -> Optional[tuple[Path, str]]:
    """(path, flag) of the output an OSError was writing, or None (not one of ours)."""
    name = Path(exc.filename).resolve() if getattr(exc, "filename", None) else None
    for path, flag in ((folder, "--samples-folder"), (npz, "--samples-npz")):
        if path is not None and name is not None and (name == Path(path).resolve()
                                                      or Path(path).resolve() in name.parents
                                                      or name.name.startswith(Path(path).name)):
            return Path(path), flag
    return None


def evaluate(
    config: Optional[Path] = CONFIG,
    family: str = FAMILY,
    tokenizer: str = TOKENIZER,
    backbone: Optional[str] = BACKBONE,
    random_backbone: bool = RANDOM_BACKBONE,
    reference: Optional[str] = typer.Option(None, "--reference", rich_help_panel="Reference",
                                            help="Reference images: a registered dataset name or a folder "
                                            "(its <split> sub-folder when present; any image sizes).",
                                            envvar="SAR_REFERENCE"),
    reference_split: str = typer.Option("val", "--reference-split", "--split", rich_help_panel="Reference",
                                        help="Split of a reference dataset / sub-folder of a reference folder "
                                        "('.': the folder itself; a missing split is refused)."),
    reference_stats: Optional[Path] = typer.Option(None, "--reference-stats", rich_help_panel="Reference",
                                                   help="ADM-style .npz with mu / sigma for FID "
                                                   "(e.g. VIRTUAL_imagenet256_labeled.npz)."),
    num_samples: int = typer.Option(1000, "--num-samples", "-n", rich_help_panel="Sampling",
                                    help="Images to sample (class-balanced; 50000 for published FIDs)."),
    payload: Optional[list[str]] = PAYLOAD,
    text_features: Optional[Path] = TEXT_FEATURES,
    null_payload: Optional[list[str]] = NULL_PAYLOAD,
    cfg: float = CFG,
    top_k: int = TOP_K,
    top_p: float = TOP_P,
    seed: int = typer.Option(0, "--seed", rich_help_panel="Sampling", help="Sampling seed."),
    batch_size: int = typer.Option(32, "--batch-size", rich_help_panel="Sampling",
                                   help="Images per sampling / feature batch."),
    schedule: Optional[str] = SCHEDULE,
    feature_extractor: str = typer.Option("inception", "--feature-extractor", rich_help_panel="Metrics",
                                          autocompletion=_complete.names("metric"),
                                          help="inception (published FIDs) | digit-classifier (the digits "
                                          "demo only) | efficientnet-lite0 | a plugin's."),
    weights: Optional[Path] = typer.Option(None, "--feature-weights", "--inception-weights",
                                           rich_help_panel="Metrics", envvar="SAR_FEATURE_WEIGHTS",
                                           help="Local weights of the feature extractor (for inception: "
                                           "torch-fidelity's pt_inception-2015-12-05 file)."),
    metrics: str = typer.Option("fid,isc,kid,prc", "--metrics", rich_help_panel="Metrics",
                                help="Comma list of fid, isc, kid, prc."),
    samples_folder: Optional[Path] = typer.Option(None, "--samples-folder", rich_help_panel="Output",
                                                  help="Also write every sample as PNG."),
    samples_npz: Optional[Path] = typer.Option(None, "--samples-npz", rich_help_panel="Output",
                                               help="Also write samples as ADM's arr_0 .npz."),
    save_reference_stats: Optional[Path] = typer.Option(
        None, "--save-reference-stats", rich_help_panel="Output",
        help="Also save the reference set's FID mu / sigma (.npz) for reuse."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", rich_help_panel="Output",
                                       help="Write the report as JSON here."),
    override: Optional[list[str]] = OVERRIDE,
    device: str = DEVICE,
) -> None:
    """Sample N images class-balanced (or conditioned on the rows of --payload NAME=FILE /
    --text-features, cycled to N) from the model and compare them with a reference set
    through torch-fidelity. Nothing is downloaded:
    Inception needs --feature-weights.

    Example: [bold]sar eval -f var --tokenizer vae.pth --backbone var_d16.pth -n 50000 --cfg 1.5
    --reference-stats VIRTUAL_imagenet256_labeled.npz --metrics fid,isc --feature-weights pt_inception.pth[/]"""
    from sar_core.checkpoint_io import atomic_write_text
    from sar_core.evaluate.metrics import evaluate_adapter, get_feature_extractor, reference_statistics, save_statistics
    from sar_core.evaluate.inputs import reference_set

    console = Console()
    try:
        if num_samples < 2:
            raise ValueError(f"--num-samples must be >= 2, got {num_samples}")
        if save_reference_stats is not None and reference is None:
            raise ValueError("--save-reference-stats needs --reference")
        # every output path and the extractor first: neither fails after the sampling pass
        for path, flag in ((out, "--out"), (samples_npz, "--samples-npz"),
                           (save_reference_stats, "--save-reference-stats")):
            writable_file(path, flag)
        writable_folder(samples_folder, "--samples-folder")
        extractor = get_feature_extractor(feature_extractor, weights)
        adapter = load_model(console, family, tokenizer, backbone, device, random_backbone, override,
                             null_payloads=null_payload, needs_null=True)
        conditions = condition_payloads(adapter, payload, text_features)
        with pass_progress(console) as start:
            report = evaluate_adapter(
                adapter, num_samples=num_samples, extractor=extractor, reference=reference,
                reference_split=reference_split, reference_stats=reference_stats,
                metrics=[m.strip() for m in metrics.split(",") if m.strip()], cfg=cfg, top_k=top_k,
                top_p=top_p, seed=seed, batch_size=batch_size, schedule=schedule,
                samples_folder=samples_folder, samples_npz=samples_npz, progress=start,
                conditions=conditions)
            if save_reference_stats is not None:
                ref = reference_set(reference, reference_split, tuple(report["image_size"]))
                stats = reference_statistics(ref, extractor, adapter.device, batch_size,
                                             start("reference statistics", len(ref)))
                with writing(console, save_reference_stats, "--save-reference-stats"):
                    save_statistics(stats, save_reference_stats)
                console.print(f"wrote reference statistics to {save_reference_stats}")
    except user_errors() as exc:
        fail(console, exc)
    except OSError as exc:  # the samples folder / .npz, written during the pass
        where = _written(exc, samples_folder, samples_npz)
        if where is None:
            raise
        fail(console, write_failed(exc, *where))
    report.update({"tokenizer": str(tokenizer), "backbone": str(backbone) if backbone else None})
    print_report(console, report)
    if report.get("feature_extractor") != "inception":
        console.print("[yellow]warning:[/] FID with non-Inception features is not comparable with published "
                      "numbers", highlight=False)
    if out is not None:
        with writing(console, out, "--out"):
            atomic_write_text(json.dumps(report, indent=2), out)
        console.print(f"wrote {out}")


def add_to(app: typer.Typer) -> None:
    app.command("eval")(evaluate)
