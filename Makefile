# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
# Each creates .venv on first use and installs only the extra it needs: the
# demo needs `.[experiments]`; the tests need `.[test]` (which adds Tunix).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test install clean

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	touch $@

$(VENV)/.installed-experiments: pyproject.toml $(VENV)/.created
	$(PY) -m pip install --quiet -e '.[experiments]'
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.created
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed-test

demo: $(VENV)/.installed-experiments
	$(PY) -m experiments.alignment_tax

test: $(VENV)/.installed-test
	$(PY) -m pytest -q -n 2 tests

clean:
	rm -rf $(VENV) results
