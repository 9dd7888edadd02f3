# Build, test and read "Deep Implicit Layers". Needs only python3 and make: every target that
# runs Python first creates .venv with everything the book needs.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
STAMP := $(VENV)/.installed

# torch goes in first, pinned, so that the range in requirements.txt is already satisfied and
# pip does not pull a CUDA build. CI points TORCH_INDEX_URL at the CPU wheel index.
TORCH_VERSION := 2.13.0
TORCH_INDEX_URL ?=

# jupyter-book writes into $(OUTPUT)/_build; the tests build into a temporary OUTPUT with a
# configuration that skips execution.
OUTPUT ?= .
JB_CONFIG ?= _config.yml
JB := $(BIN)/jupyter-book build . --path-output $(OUTPUT) --config $(JB_CONFIG)
# The notebooks are written afresh each time: sphinx-tojupyter only rewrites a notebook whose
# source is newer, which misses re-executed (glued) outputs and keeps notebooks of removed pages.
# It also ends the process with status 0 from its finish step, which would swallow warnings
# collected by --keep-going; without it the first warning fails the build.
NOTEBOOKS := rm -rf $(OUTPUT)/_build/jupyter && $(JB) --builder custom --custom-builder jupyter -W -n

# One test worker per core (they share one build of the site, see code/tests/conftest.py); the slowest
# tests are listed at the end so that the suite's time budget can be watched.
TEST_ARGS ?= -n auto --durations=20

PORT ?= 8000
# For example LAB_ARGS=--no-browser, or --allow-root inside a container.
LAB_ARGS ?=

# Kernels and subprocesses started by the build find the environment's tools first.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: book notebooks test serve lab clean bench

$(STAMP): requirements.txt code/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(PY) -m pip install -r requirements.txt
	touch $@

# The benchmarks compare our solvers with torchdeq, jaxopt, optimistix, torchdiffeq, torchode, diffrax,
# qpth, proxsuite, cvxpylayers and qpax, which install into an environment of their own, never into the book's.
# qpth goes in on its own, without its dependencies (see benchmarks/requirements.txt for why). BENCH_ARGS passes
# options on to all four scripts, for example BENCH_ARGS=--quick.
BENCH_VENV := .venv-bench
BENCH_PY := $(BENCH_VENV)/bin/python
BENCH_STAMP := $(BENCH_VENV)/.installed
BENCH_ARGS ?=

$(BENCH_STAMP): benchmarks/requirements.txt code/pyproject.toml
	test -x $(BENCH_PY) || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_PY) -m pip install "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(BENCH_PY) -m pip install -r benchmarks/requirements.txt
	$(BENCH_PY) -m pip install --no-deps "qpth==0.0.16"
	touch $@

# --all re-reads every page (executions come from the cache), so warnings from pages that did
# not change are reported again instead of passing silently on a second run.
book: $(STAMP)
	$(JB) --all -W -n --keep-going
	$(NOTEBOOKS)

notebooks: $(STAMP)
	$(NOTEBOOKS)

test: $(STAMP)
	BOOK_QUICK=1 $(PY) -m pytest code/tests $(TEST_ARGS)

bench: $(BENCH_STAMP)
	$(BENCH_PY) benchmarks/fixed_point.py $(BENCH_ARGS)
	$(BENCH_PY) benchmarks/ode.py $(BENCH_ARGS)
	$(BENCH_PY) benchmarks/qp.py $(BENCH_ARGS)
	$(BENCH_PY) benchmarks/deq.py $(BENCH_ARGS)

serve:
	@test -f $(OUTPUT)/_build/html/index.html || { echo "No site in $(OUTPUT)/_build/html: run 'make book' first." >&2; exit 1; }
	$(PYTHON) -m http.server $(PORT) --bind 127.0.0.1 --directory $(OUTPUT)/_build/html

# Chapters are MyST markdown; this makes JupyterLab open them as notebooks (through jupytext)
# instead of as text, for this environment only.
lab: $(STAMP)
	mkdir -p $(VENV)/share/jupyter/lab/settings
	printf '%s\n' '{"@jupyterlab/docmanager-extension:plugin": {"defaultViewers": {"markdown": "Jupytext Notebook", "myst": "Jupytext Notebook"}}}' \
		> $(VENV)/share/jupyter/lab/settings/overrides.json
	$(BIN)/jupyter lab $(LAB_ARGS)

clean:
	rm -rf $(OUTPUT)/_build
