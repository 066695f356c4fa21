# rift_dist — make run / make test / make bench. Every target installs what it needs first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SHARED ?= ../shared
RUN_DIR ?= runs/default
export RIFT_SHARED_DATA ?= $(abspath $(SHARED))/data

.PHONY: install run test test-all bench clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.py scripts/install_ffcv.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	bash scripts/install_deepspeed.sh $(PY)
	bash scripts/install_ffcv.sh $(PY)
	touch $@

run: install
	$(VENV)/bin/rift run configs/default.yaml --run-dir $(RUN_DIR) --set data.archive=$(RIFT_SHARED_DATA)/cifar10-jpeg.tar.gz

test: install
	bash scripts/slurm/install.sh
	bash scripts/install_chromium.sh
	$(VENV)/bin/pytest -q -m "not slow" --durations=15

test-all: install
	bash scripts/slurm/install.sh
	bash scripts/install_chromium.sh
	$(VENV)/bin/pytest -q --durations=15

# bench_mrc at T = 2 ascent passes (the README's figures; ~25 min on 2 cores); BENCH_MRC_ARGS= for the paper's T = 10
BENCH_MRC_ARGS ?= --iterations 2 --train-steps 200 --memory
bench: install
	@echo "== benchmarks/bench_mrc.py $(BENCH_MRC_ARGS)" && $(PY) benchmarks/bench_mrc.py $(BENCH_MRC_ARGS)
	@echo "== benchmarks/bench_at_step.py --all" && $(PY) benchmarks/bench_at_step.py --all
	@echo "== benchmarks/bench_limit.py --all" && $(PY) benchmarks/bench_limit.py --all
	@echo "== benchmarks/bench_precision.py" && $(PY) benchmarks/bench_precision.py
	@echo "== benchmarks/bench_mrc_ranks.py" && $(PY) benchmarks/bench_mrc_ranks.py
	@echo "== benchmarks/bench_data_loading.py" && $(PY) benchmarks/bench_data_loading.py

clean:
	rm -rf runs mlflow.db mlartifacts .pytest_cache
