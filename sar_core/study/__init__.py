"""``sar study``: families x arms x seeds from one start checkpoint, evaluated alike. The
study file (``config``), its plan of runs (``plan``), how each run is evaluated
(``evaluate``; class-conditional and text-conditioned models alike), running it in one
process or as parallel jobs (``run``, ``jobs``), and the report with paired differences,
intervals and noise (``stats``, ``report``). ``sar compare`` (``compare``, ``compare_report``)
evaluates a few checkpoints the same way and pairs them over sampling seeds and
validation images.

May import: everything below it (contract, ``sar``, ``data``, ``train``, ``evaluate``).
Nothing imports ``study`` except the CLI and the plugins.
"""

from sar_core._moved import names_from

# ``sar_core.study`` was one module before the sub-packages: its names stay importable from here
__getattr__ = names_from({
    **dict.fromkeys(("HIGHER_IS_BETTER", "SAMPLED", "FIXED", "RunSpec", "plan", "check_registered",
                     "write_study_file", "read_study", "training_data", "arm_config", "longest_first"),
                    "sar_core.study.plan"),
    **dict.fromkeys(("FamilyContext", "evaluate_model", "evaluate_start", "fixed_from"), "sar_core.study.evaluate"),
    **dict.fromkeys(("run_one", "run_study"), "sar_core.study.run"),
})
