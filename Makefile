# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
# Each creates .venv and installs the project into it on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test install clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m experiments.alignment_tax

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 tests

clean:
	rm -rf $(VENV) results
