"""``sar study``: run a cross-architecture study, aggregate one (``sar study report DIR``), or
archive its record without the weights (``sar study archive DIR --into DEST``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from sar_cli import _complete
from sar_cli._shared import fail, user_errors


def _load(console: Console, path: Optional[str], preset: Optional[str], models: Optional[Path], sets: list[str]):
    from sar_core.train.config import parse_set
    from sar_core.study.config import load_study, read_families
    from sar_plugins.studies import preset_path

    if (path is None) == (preset is None):
        raise ValueError("give a study file (sar study STUDY.yaml) or --preset NAME (one of the two)")
    file = preset_path(preset) if preset else Path(path)
    families = read_families(models) if models else None
    return load_study(file, parse_set(sets), families)


def study(
    target: Optional[str] = typer.Argument(None, help="STUDY.yaml to run, or the word 'report' or 'archive'."),
    folder: Optional[Path] = typer.Argument(None, help="With 'report': the study folder to aggregate; with "
                                            "'archive': the study folder to archive."),
    preset: Optional[str] = typer.Option(None, "--preset", autocompletion=_complete.presets,
                                         help="A shipped study instead of a file "
                                         f"({', '.join(_complete.presets(''))})."),
    out: Optional[Path] = typer.Option(None, "--out", help="Study folder (default: runs/study-<name>)."),
    models: Optional[Path] = typer.Option(None, "--models", help="YAML with a `families` mapping that replaces "
                                          "the study's (run a preset on your checkpoints)."),
    arm: Optional[str] = typer.Option(None, "--arm", help="Run only this arm (one cluster job); 'start' "
                                      "only tokenises the data and evaluates the start model."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Run only this training seed."),
    family: Optional[str] = typer.Option(None, "--family", help="Run only this family label."),
    sets: list[str] = typer.Option([], "--set", help="Override a study field: --set run.train.steps=50, "
                                   "--set seeds=[0,1,2], --set eval.samples_per_class=20."),
    jobs: int = typer.Option(1, "--jobs", help="Train / evaluate this many runs at once as local processes "
                             "(one thread each; e.g. 2 on a 2-core machine)."),
    launcher: str = typer.Option("local", "--launcher", help="local (this machine; --jobs N processes) or "
                                 "slurm (submit the start job, one array of runs after it, then the report; "
                                 "needs pip install 'sar[slurm]')."),
    slurm_partition: Optional[str] = typer.Option(None, "--slurm-partition", rich_help_panel="SLURM",
                                                  help="Partition of every job (required with --launcher slurm)."),
    slurm_time: int = typer.Option(240, "--slurm-time", rich_help_panel="SLURM",
                                   help="Minutes per job; a run still going is checkpointed and requeued."),
    slurm_gpus: int = typer.Option(1, "--slurm-gpus", rich_help_panel="SLURM",
                                   help="GPUs per run (more than 1: torchrun on one node; 0: CPU only)."),
    slurm_cpus: int = typer.Option(8, "--slurm-cpus", rich_help_panel="SLURM", help="CPUs per run (torch threads)."),
    slurm_mem_gb: Optional[float] = typer.Option(None, "--slurm-mem-gb", rich_help_panel="SLURM",
                                                 help="Memory per run in GB (default: the partition's)."),
    slurm_account: Optional[str] = typer.Option(None, "--slurm-account", rich_help_panel="SLURM"),
    slurm_qos: Optional[str] = typer.Option(None, "--slurm-qos", rich_help_panel="SLURM"),
    slurm_array_parallelism: int = typer.Option(64, "--slurm-array-parallelism", rich_help_panel="SLURM",
                                                help="Runs of the array at once."),
    slurm_setup: list[str] = typer.Option([], "--slurm-setup", rich_help_panel="SLURM",
                                          help="Shell line run before each job, repeatable (e.g. 'source "
                                          "venv/bin/activate')."),
    device: str = typer.Option("auto", "--device", help="Device of the evaluations (training: run.train.device)."),
    threads: Optional[int] = typer.Option(1, "--threads", help="torch CPU threads (0: torch's default)."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved study and exit."),
    experiment: Optional[str] = typer.Option(None, "--experiment", help="Run only the runs this experiment of "
                                             "the study needs, then write its report; with 'report': only this "
                                             "experiment's report (default: the whole study and each experiment)."),
    into: Optional[Path] = typer.Option(None, "--into", help="With 'report': write the report into this folder, "
                                        "its sample grids and maps copied beside it (publishable without the "
                                        "run folders). With 'archive': copy the study's record (study.yaml, every "
                                        "run's eval.json, config and loss log, the difference maps; no weights) "
                                        "into this folder, which `sar study report` aggregates and `sar study` "
                                        "continues."),
    grids: bool = typer.Option(True, "--grids/--no-grids", help="With 'report --into': copy the sample grids "
                               "too (--no-grids: only plots and difference maps, a lighter folder)."),
) -> None:
    """Families x arms x seeds from one start checkpoint per family: every arm an ordinary
    `sar train` run folder, every run evaluated with the same sampling seeds, then a report
    with paired differences and 95% intervals over seeds, the metric's own noise,
    exposure-gap curves, sample grids and difference maps (report.md / .html / .json).
    `sar study report DIR` re-aggregates a folder (e.g. after `--arm` jobs); `sar study
    archive DIR --into DEST` keeps its record without the weights (small enough to commit)."""
    import torch

    console = Console()
    if threads:
        torch.set_num_threads(threads)
    try:
        if target == "archive":
            if folder is None or into is None:
                raise ValueError("sar study archive needs the study folder and --into: sar study archive DIR --into DEST")
            from sar_core.study.archive import archive_study

            done = archive_study(folder, into)
            console.print(f"archived {len(done['runs'])} evaluated runs and {len(done['starts'])} start models of "
                          f"{folder} into {into} ({len(done['missing'])} runs not evaluated yet); "
                          f"aggregate with: sar study report {into}", highlight=False)
            return
        if target == "report":
            if folder is None:
                raise ValueError("sar study report needs the study folder: sar study report DIR")
            from sar_core.study.report import write_report, write_reports

            if experiment is None and into is None:
                results = write_reports(folder)
                where = folder / "report.md"
            else:
                results = write_report(folder, experiment, into, copy_pictures=into is not None, grids=grids)
                where = Path(into or folder / "experiments" / experiment) / "report.md"
            _summary(console, results)
            console.print(f"report: {where} (also report.html, report.json, plots/)")
            for name in results["study"].get("experiments") or {} if experiment is None and into is None else ():
                console.print(f"experiment {name}: {folder / 'experiments' / name / 'report.md'}")
            return
        if into is not None or not grids:
            raise ValueError("--into / --no-grids go with `sar study report DIR`")
        if folder is not None:
            raise ValueError(f"unexpected argument '{folder}' (only `sar study report DIR` takes a folder)")
        cfg = _load(console, target, preset, models, sets)
        if print_config:
            import yaml

            console.print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), highlight=False)
            return
        from sar_core.study.run import run_study

        dest = out or Path("runs") / f"study-{cfg.name}"
        if jobs < 1:
            raise ValueError(f"--jobs must be >= 1, got {jobs}")
        from sar_cli._outputs import writable_folder

        writable_folder(dest, "--out")  # before any run: a read-only study folder loses no work
        if launcher == "slurm":
            from sar_core.study.slurm import SlurmOptions

            if not slurm_partition:
                raise ValueError("--launcher slurm needs --slurm-partition NAME")
            if jobs != 1 or arm is not None or seed is not None or experiment is not None:
                raise ValueError("--launcher slurm submits every run as its own job: drop --jobs / --arm / --seed "
                                 "/ --experiment")
            opts = SlurmOptions(partition=slurm_partition, time_min=slurm_time, gpus_per_run=slurm_gpus,
                                cpus_per_run=slurm_cpus, mem_gb=slurm_mem_gb, account=slurm_account,
                                qos=slurm_qos, array_parallelism=slurm_array_parallelism, setup=list(slurm_setup))
            _submit(console, cfg, dest, family, opts)
            return
        if launcher != "local":
            raise ValueError(f"--launcher must be local or slurm, got {launcher!r}")
        results = _run(console, cfg, dest, family, arm, seed, device, jobs, experiment)
    except user_errors() as exc:
        fail(console, exc)
    except RuntimeError as exc:  # a run stopped (non-finite, a signal) or a local job failed: see its log
        from sar_core.study.run import RunStopped
        from sar_core.train.signals import EXIT_INTERRUPTED, EXIT_SIGNALLED

        if isinstance(exc, RunStopped) and exc.status in ("signalled", "interrupted"):
            # checkpoint written: the same command continues (a SLURM requeue does just that)
            Console(stderr=True, soft_wrap=True).print(" ".join(str(exc).split()), style="yellow", highlight=False)
            raise typer.Exit(EXIT_SIGNALLED if exc.status == "signalled" else EXIT_INTERRUPTED)
        job_failed(exc)
    if results is not None:
        _summary(console, results)
        where = dest / "experiments" / experiment if experiment else dest
        console.print(f"report: {where / 'report.md'} (also report.html, report.json, plots/)")
    else:
        console.print(f"done; aggregate with: sar study report {dest}")


def _submit(console: Console, cfg, dest: Path, family, opts) -> None:
    from sar_core.plugins import get_registry
    from sar_core.study.plan import check_registered, plan, write_study_file
    from sar_core.study.slurm import submit_study

    check_registered(cfg, get_registry())
    runs = plan(cfg, family)
    dest.mkdir(parents=True, exist_ok=True)
    write_study_file(cfg, dest)  # every job checks it runs this study
    submit_study(dest, runs, opts, cfg.name, family, log=lambda m: console.print(m, highlight=False))
    console.print(f"job ids and commands: {dest / 'slurm' / 'jobs.json'}; logs: {dest / 'slurm'}/<job id>/; "
                  f"follow with: squeue -u $USER", highlight=False)


def job_failed(exc: BaseException) -> None:
    """One line on stderr, exit status 1 (the run's own log holds the details)."""
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {' '.join(str(exc).split())}", highlight=False)
    raise typer.Exit(1)


def _run(console: Console, cfg, dest: Path, family, arm, seed, device, jobs: int = 1, experiment=None):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from sar_core.study.run import run_study
    from sar_core.study.plan import plan
    from sar_core.study.config import START

    runs = [] if arm == START else plan(cfg, family, arm, seed, experiment)
    steps = int(cfg.run.get("train", {}).get("steps", 1000))
    total = sum(int(cfg.arms[r.arm].get("train", {}).get("steps", steps)) for r in runs)
    cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TimeRemainingColumn())
    with Progress(*cols, console=console) as progress:
        task = progress.add_task(f"study {cfg.name}: optimizer steps", total=total)
        return run_study(cfg, dest, family=family, arm=arm, seed=seed, device=device, jobs=jobs, experiment=experiment,
                         log=lambda m: progress.console.print(m, highlight=False),
                         advance=lambda n: progress.advance(task, n))


def _summary(console: Console, results: dict) -> None:
    from rich.table import Table

    from sar_core.study.plan import HIGHER_IS_BETTER
    from sar_core.study.report import LABELS, verdict_text

    control = results["study"]["control"]
    for label, fam in results["families"].items():
        others = [a for a in fam["arms"] if a != control]
        table = Table(title=f"{label}: arm - {control}, mean [95% interval over training seeds]: verdict",
                      caption="better / worse only where the interval excludes 0; inconclusive: it holds 0; "
                              "undefined: one seed or zero spread; control: flat within 2 noise sd")
        for col in ["metric", "noise sd", *others, f"{control} - start", "control"]:
            table.add_column(col)
        for k, per_arm in fam["differences"].items():
            nz = fam["noise"][k]
            sd = "-" if nz.get("sd") is None else f"{nz['sd']:.4g}"
            flat = {True: "flat", False: "moved", None: "-"}[fam["control_flat"].get(k)]
            table.add_row(LABELS.get(k, k), f"SE {sd}" if nz.get("deterministic") else sd,
                          *[verdict_text(per_arm.get(a), HIGHER_IS_BETTER[k]) for a in others],
                          verdict_text(fam["control_change"][k], HIGHER_IS_BETTER[k]), flat)
        console.print(table)


def add_to(app: typer.Typer) -> None:
    app.command("study")(study)
