# make demo: the main job on the embedded (synthetic) default.  make test: every test.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench bench-gpu venv clean-runs

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e . || $(PY) -m pip install -q --no-deps -e .
	command -v chromium >/dev/null || { test "$$(id -u)" = 0 && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } || \
	  echo "Debian's chromium is missing: tests/test_jupyterlab.py skips, or fails under CI"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m mtml.reproduce --demo

# tests/ includes the short stress check of the widget notebooks (tests/test_execution.py; the long
# one is bench/stress_notebooks.py). nbval's per-cell limit: 4 x the longest smoke budget in
# mtml/execution.py, or MTML_CELL_TIMEOUT seconds.
test: $(STAMP)
	$(PY) -m pytest -q -ra tests
	MTML_SMOKE=1 $(PY) -m pytest -q -ra --nbval-lax --nbval-cell-timeout=$${MTML_CELL_TIMEOUT:-960} notebooks/

bench: $(STAMP)
	$(PY) bench/run_all.py

# one table of GPU figures in about 8 minutes on one H100/H200 (bench/results/gpu_check.md)
bench-gpu: $(STAMP)
	$(PY) bench/gpu_check.py

clean-runs:
	rm -rf runs
