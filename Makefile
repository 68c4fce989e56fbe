# lensjax: `make test`, `make demo`, `make bench` create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP_TEST := $(VENV)/.installed-test
STAMP_BENCH := $(VENV)/.installed-bench

.PHONY: test demo bench gallery clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP_TEST): requirements.txt requirements-test.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -r requirements-test.txt
	touch $@

$(STAMP_BENCH): $(STAMP_TEST) requirements-bench.txt
	$(BIN)/python -m pip install --quiet -r requirements-bench.txt
	touch $@

test: $(STAMP_TEST)
	$(BIN)/python -m pytest -q tests

demo: $(STAMP_TEST)
	$(BIN)/python -m lensjax.sim.gallery --preset common_test --out runs/demo/gallery_common_test.png
	$(BIN)/python -m lensjax.sim.gallery --preset model_i --out runs/demo/gallery_model_i.png

bench: $(STAMP_BENCH)
	$(BIN)/python experiments/benchmarks/bench_sim.py

clean:
	rm -rf $(VENV) .pytest_cache
