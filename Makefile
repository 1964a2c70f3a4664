# The two commands of the README: `make demo` and `make test`. Both set up the pinned
# CPU environment in .venv first (about 2 minutes, once).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# 2 cores: more threads than cores makes tiny models many times slower.
export OMP_NUM_THREADS ?= 2
export TOKENIZERS_PARALLELISM := false
export RAY_AUTH_MODE := disabled
export HF_HUB_OFFLINE := 1

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mmkd demo $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -ra tests $(TEST_ARGS)

clean:
	rm -rf runs .pytest_cache
