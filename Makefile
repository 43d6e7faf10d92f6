# Two set-up commands for a fresh machine (see README): `make demo` and `make test`.
# Both create the virtual environment .venv from nothing on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sar-installed

.PHONY: demo test bench bench-pytest bench-gpu bench-cli clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-compile -e '.[dev,demo]'
	@# byte-compile only what sar imports (~3k modules; pip would compile all ~10k files of torch
	@# and its CUDA wheels), even where PYTHONDONTWRITEBYTECODE is set: saves ~10 s per process
	env -u PYTHONDONTWRITEBYTECODE $(PY) -c "import matplotlib.figure, pytest, sar_cli.main, sar_core.study.run, \
	    sar_core.study.report, sar_core.evaluate.metrics; from sar_core.plugins import get_registry; get_registry()"
	@# help renders through rich's markdown and emoji tables, imported only then
	env -u PYTHONDONTWRITEBYTECODE $(VENV)/bin/sar --help >/dev/null
	env -u PYTHONDONTWRITEBYTECODE $(VENV)/bin/sar train --help >/dev/null
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sar demo

# the tests are single-threaded (OMP_NUM_THREADS=1): two pytest-xdist workers use both cores of
# a 2-core CI machine; --dist loadfile keeps each file (and its module-scoped fixtures, e.g. the
# spawned gloo ranks) in one worker. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile) tests

# SAR step vs TF step at two sizes: interleaved rounds, busy rounds repeated, per-round
# ratio medians with bootstrap intervals, step and whole-process peak memory (~5 min);
# then peak RSS of loading / saving a VAR-d16-sized checkpoint (~3 min, 1.7 GB in $TMPDIR).
bench: $(STAMP)
	nice -n 5 $(PY) benchmarks/step_bench.py --size tiny --size large --quiet
	nice -n 5 $(PY) benchmarks/checkpoint_memory.py

# the pytest-benchmark files (step ratios, samplers, tokenizing, code cache)
bench-pytest: $(STAMP)
	nice -n 5 $(PY) -m pytest -q -s -p no:cacheprovider benchmarks

# start-up of `sar --help`, `sar train --help` and a TAB completion (wall and CPU time, 20 runs each)
bench-cli: $(STAMP)
	$(PY) benchmarks/cli_startup.py

# one GPU, < 5 min: bf16 steps and samplers of a VAR-d16-sized model (see benchmarks/gpu.sh)
bench-gpu: $(STAMP)
	PY=$(PY) bash benchmarks/gpu.sh

clean-venv:
	rm -rf $(VENV)
