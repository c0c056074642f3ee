# make demo: the main job on the embedded (synthetic) default.  make test: every test.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench bench-gpu mutation promises venv clean-runs

venv: $(STAMP)

# torch's CUDA build makes a new venv about 6.5 GB: check the disk first, not after pip fails midway.
$(STAMP): requirements.txt pyproject.toml
	@need=$$(test -x $(PY) && echo 1 || echo 8); \
	free=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}'); \
	test "$$free" -ge "$$need" || { echo "make: $$free GiB free on $$(df -P . | awk 'NR==2 {print $$6}'), \
	the venv needs about $$need GiB: free disk space (old clones, /tmp) and rerun make" >&2; exit 1; }
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e . || $(PY) -m pip install -q --no-deps -e .
	command -v chromium >/dev/null || { test "$$(id -u)" = 0 && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } || \
	  echo "Debian's chromium is missing: tests/test_jupyterlab.py skips, or fails under CI"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m mtml.teach.demo

# tests/ includes the short stress check of the widget notebooks (tests/test_execution.py; the long
# one is bench/stress_notebooks.py). nbval's per-cell limit: 4 x the longest smoke budget in
# mtml/runs/execution.py, or MTML_CELL_TIMEOUT seconds. nbval runs a copy of notebooks/ in a
# temporary folder, so its runs and data land there: nothing is reloaded from an earlier `make test`,
# and the checkout's data/ and runs/ stay as they were (tests/conftest.py checks it for tests/).
test: $(STAMP)
	$(PY) -m pytest -q -ra --durations=15 tests
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && trap 'exit 130' INT TERM && cp -r notebooks "$$tmp/" && \
	  MTML_SMOKE=1 MTML_DATA_DIR="$$tmp/data" $(PY) -m pytest -q -ra -p no:cacheprovider -c pyproject.toml --rootdir "$$tmp" --nbval-lax \
	    --nbval-cell-timeout=$${MTML_CELL_TIMEOUT:-960} "$$tmp/notebooks"

bench: $(STAMP)
	$(PY) bench/run_all.py

# one table of GPU figures in about 10-15 minutes on one H100/H200 (an estimate) (bench/results/gpu_check.md)
bench-gpu: $(STAMP)
	$(PY) bench/gpu_check.py

# mutation score of the core modules against their fast tests (bench/mutation.py, in scratch copies under
# /tmp; bench/results/mutation.md). Needs mutmut, kept out of requirements.txt: the script prints the pip line.
# MODULES="losses stats" picks a subset; about 4 minutes for losses on one core.
mutation: $(STAMP)
	$(PY) bench/mutation.py $(if $(MODULES),--modules $(MODULES))

# each promise of the README broken on purpose in a scratch copy, and whether its test notices
# (bench/promises.py; bench/results/promises.md); about 2 minutes
promises: $(STAMP)
	$(PY) bench/promises.py

clean-runs:
	rm -rf runs
