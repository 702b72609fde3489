# sftkit: two commands on a fresh machine.
#   make demo   prepare data_samples/ with the bundled tokenizer, train the tiny model a few steps
#   make test   run the test suite
#   make lint   ruff: the linter and the formatter's check (pyproject.toml [tool.ruff])
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.sftkit-installed
# A CPU build of torch is enough for tests and the demo; where a local wheel of it lies on disk
# (this workplace's machines) take it, so set-up never pulls a multi-GB CUDA build.
TORCH_CPU ?= torch==2.13.0

export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
export PREFECT_LOGGING_TO_API_BATCH_INTERVAL ?= 0.3
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test lint format bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_CPU)" || $(PIP) install -q "torch>=2.2,<3"
	$(PIP) install -q -e ".[dev,dask]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	rm -rf demo_out
	$(VENV)/bin/sftkit prepare data_samples/inputs/* --tokenizer data_samples/tokenizer \
		--out demo_out/data --config data_samples/demo.yaml
	@# A randomly initialised tiny model needs a far larger learning rate than the 1e-5 default
	@# for pretrained models to show its loss falling within 30 steps.
	$(VENV)/bin/sftkit train --data demo_out/data --out demo_out/run --model tiny \
		--max-steps 30 --batch-tokens 2048 --lr 1e-3 --eval-every 10 --device cpu
	$(VENV)/bin/sftkit inspect demo_out/data
	@echo
	@echo "Prepared shards:  demo_out/data/shards/   (manifest: demo_out/data/manifest.json)"
	@echo "Rejected records: demo_out/data/rejected/"
	@echo "Training run:     demo_out/run/           (metrics.jsonl, loss.png, final/)"

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# make bench         runs the quick benchmarks behind the README's table (ingest, per-turn cost, shard
#                    writer memory, loader: a few minutes on 2 cores), then prints the whole table from the
#                    stamped results in bench/results/ (rows not re-run show their last recorded figures).
# make bench FULL=1  also the slow ones (each 2-6 minutes on 2 cores, about half an hour in all): dedup,
#                    mixture, inspect_1m, flow_overhead, loss_memory (~16 GB of RAM), quality (its datatrove
#                    peer needs /tmp/dt-venv, see bench/quality.py) and prepare_vs_trl (needs trl in .bench/venv).
BENCH_PY ?= .bench/venv/bin/python
bench: $(STAMP)
	$(PY) -m bench.ingest_rss
	$(PY) -m bench.per_turn_cost
	$(PY) -m bench.shard_memory --conversations 100000
	$(PY) -m bench.loader
ifneq ($(FULL),)
	$(PY) -m bench.dedup
	$(PY) -m bench.mixture
	$(PY) -m bench.inspect_1m
	$(PY) -m bench.flow_overhead
	$(PY) -m bench.loss_memory
	$(PY) -m bench.quality
	$(BENCH_PY) -m bench.prepare_vs_trl --repeats 3
	$(BENCH_PY) -m bench.prepare_vs_trl --vocab 32000
endif
	@$(PY) -m bench.table

clean:
	rm -rf demo_out .pytest_cache .prefect
