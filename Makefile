# chimera_jax: `make demo` trains the default model on the bundled corpus and samples; `make test` runs the tests.
# Both create the Python 3.12 virtualenv in .venv first if it is missing.

PYTHON ?= python3.12
# Under pyenv, select an installed 3.12 when none is active.
ifeq ($(shell $(PYTHON) --version >/dev/null 2>&1 && echo ok),)
export PYENV_VERSION ?= $(shell pyenv versions --bare 2>/dev/null | grep '^3\.12' | tail -1)
endif
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= workdirs/demo
DEMO_CONFIG ?= configs/lm.py:arch=dense,size=tiny

.PHONY: setup demo test test-fast clean

setup: $(STAMP)

$(STAMP): setup.py requirements-dev.txt
	@$(PYTHON) --version >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (Python 3.12 is required; set PYTHON=...)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e . -r requirements-dev.txt
	touch $(STAMP)

demo: setup
	rm -rf $(DEMO_DIR)
	$(PY) -m chimera_jax.train --config=$(DEMO_CONFIG) --workdir=$(DEMO_DIR)
	$(PY) -m chimera_jax.generate --workdir=$(DEMO_DIR) --prompt="ROMEO:" --max_new_tokens=300 --temperature=0.8 --top_k=40 --stop_at_eos=false

test: setup
	$(PY) -m pytest -q -n 2 --dist=loadfile --durations=15 tests

clean:
	rm -rf $(VENV) workdirs .pytest_cache
