# sftkit: two commands on a fresh machine.
#   make demo   prepare data_samples/ with the bundled tokenizer, train the tiny model a few steps
#   make test   run the test suite
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

.PHONY: install demo test bench clean

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

bench: $(STAMP)
	@ls bench/*.py

clean:
	rm -rf demo_out .pytest_cache .prefect
