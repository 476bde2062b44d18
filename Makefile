PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test test-fast demo bench gpu-check clean

setup: $(STAMP)

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

# pytest-xdist workers: most of the suite's time is single-threaded (starting CLIs, decoding, Python),
# so two workers finish sooner even on two cores. TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n $(TEST_WORKERS) tests

# Leaves out the tests marked slow (subprocess CLIs, end-to-end runs); `make test` runs everything.
test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow" tests

demo: $(STAMP)
	HF_HUB_OFFLINE=1 PATH="$(CURDIR)/$(VENV)/bin:$$PATH" ./run_qualiclip_experiments.sh --demo

bench: $(STAMP)
	$(PY) bench/bench.py

# Every CUDA path of both stages, and the GPU figures (bench/gpu_check.py, within a budget of 8 minutes).
# On a GPU machine whose python3 already holds the requirements: make gpu-check PYTHON_GPU=python3
PYTHON_GPU ?= $(PY)
gpu-check:
	HF_HUB_OFFLINE=1 $(PYTHON_GPU) bench/gpu_check.py --device cuda

clean:
	rm -rf $(VENV) runs checkpoints results demo_data bench/results
