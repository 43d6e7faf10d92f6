# Two set-up commands for a fresh machine (see README): `make demo` and `make test`.
# Both create the virtual environment .venv from nothing on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sar-installed

.PHONY: demo test bench clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,demo]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sar demo

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

bench: $(STAMP)
	$(PY) -m pytest -q -s -p no:cacheprovider benchmarks

clean-venv:
	rm -rf $(VENV)
