# lensjax: `make test`, `make demo`, `make bench` create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP_RUN := $(VENV)/.installed-run
STAMP_TEST := $(VENV)/.installed-test
STAMP_BENCH := $(VENV)/.installed-bench

.PHONY: test demo bench gpu-wheels gallery clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP_RUN): requirements.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $@

$(STAMP_TEST): requirements.txt requirements-test.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -r requirements-test.txt
	touch $@

$(STAMP_BENCH): $(STAMP_TEST) requirements-bench.txt
	$(BIN)/python -m pip install --quiet -r requirements-bench.txt
	touch $@

# Tests run in TEST_WORKERS pytest-xdist processes. Most of the suite's time is XLA
# compiling small programs, one core per compile, so two processes keep both cores of
# a 2-core machine busy (811 -> 590-600 s there). Each process holds up to ~6 GB (its
# compiled programs over 8 fake devices; two took ~13 GB with their subprocesses), so
# the default is 2 where at least 16 GB are available and 0 (one process) otherwise,
# rather than one per core. TEST_WORKERS=0 runs the suite in this process.
TEST_WORKERS ?= $(shell test -r /proc/meminfo \
	&& awk '/^MemAvailable:/ {print ($$2 >= 16 * 1024 * 1024) ? 2 : 0}' /proc/meminfo \
	|| echo 2)

test: $(STAMP_TEST)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal tests

demo: $(STAMP_RUN)
	$(BIN)/python -m lensjax.main --config configs/demo_classifier.py --workdir runs/demo --mode=train_eval
	$(BIN)/python -m lensjax.sim.gallery --preset model_ii --out runs/demo/gallery_model_ii.png

bench: $(STAMP_BENCH)
	$(BIN)/python experiments/benchmarks/bench_sim.py
	$(BIN)/python experiments/benchmarks/bench_noise.py
	$(BIN)/python experiments/benchmarks/bench_kernels.py
	$(BIN)/python experiments/benchmarks/bench_train.py
	$(BIN)/python experiments/benchmarks/bench_pipeline.py
	$(BIN)/python experiments/benchmarks/bench_fsdp.py

# Pure-Python wheels that GPU images often lack, for experiments/benchmarks/gpu_run.sh.
GPU_WHEELS = $(shell grep -E '^(ml-collections|clu)==' requirements.txt)
gpu-wheels: | $(BIN)/python
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: --dest .whl $(GPU_WHEELS)

clean:
	rm -rf $(VENV) .pytest_cache
