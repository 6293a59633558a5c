# make help: what each target does. Every target sets up .venv itself on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
VENV_MIN_GB ?= 7
export PATH := $(abspath $(BIN)):$(PATH)
export DVC_NO_ANALYTICS := 1
export GIT_PYTHON_REFRESH := quiet

.DEFAULT_GOAL := help
.PHONY: help venv data run serve retrain test test-fast pipeline constraints clean plots-template image image-check image-clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

venv: $(STAMP) ## create .venv with the pinned working set (constraints.txt)
$(STAMP): pyproject.toml constraints.txt
	@# The pinned set (CUDA build of torch) takes 6.6 GB: say so up front rather than fail mid-install.
	@free=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}'); [ $$free -ge $(VENV_MIN_GB) ] || \
	  { echo "make: $(VENV) needs about $(VENV_MIN_GB) GB of free disk, $$free GB free at $(CURDIR)" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[cpu,dev]'
	touch $(STAMP)

data: $(STAMP) ## materialise the embedded default dataset (digits) under data/
	@test -d data/digits || adalabelhash get-data digits --out data/digits

run: data ## run the whole pipeline (dvc repro) on the embedded default
	dvc repro

serve: $(STAMP) ## serve the registry's @champion on http://127.0.0.1:8000 (after make run; README "Serving")
	adalabelhash serve

retrain: $(STAMP) ## the drift report, then `dvc repro` only when it says so (what cron runs; README "Retraining")
	adalabelhash retrain --if-drift

test: $(STAMP) ## run the test suite (what CI runs)
	$(BIN)/python -m pytest

test-fast: $(STAMP) ## the suite without the slow end-to-end tests
	$(BIN)/python -m pytest -m "not slow"

pipeline: $(STAMP) ## recompile the Kubeflow pipeline YAML (pipelines/adalabelhash_pipeline.yaml)
	$(BIN)/python -m pipelines.pipeline

constraints: $(STAMP) ## re-pin constraints.txt from the current .venv
	{ sed -n '1,2p' constraints.txt; $(BIN)/pip freeze --exclude-editable | grep -v '^adalabelhash'; \
	  grep -A1 '^# gpu extra' constraints.txt; } > constraints.new && mv constraints.new constraints.txt

clean: ## remove pipeline outputs (keeps data/ and .venv)
	rm -rf build .cache mlflow.db mlruns mlartifacts

plots-template: ## re-inline vega into .dvc/plots-offline.html (needs npm)
	tmp=$$(mktemp -d) && cd $$tmp && npm pack --silent vega@5 vega-lite@5 vega-embed@6 >/dev/null && \
	  for f in *.tgz; do mkdir $${f%.tgz} && tar xzf $$f -C $${f%.tgz}; done && cd - >/dev/null && \
	  $(PYTHON) tools/offline_plots_template.py $$tmp/vega-5*/package/build/vega.min.js \
	    $$tmp/vega-lite-*/package/build/vega-lite.min.js $$tmp/vega-embed-*/package/build/vega-embed.min.js && \
	  rm -rf $$tmp

image: ## build the pipeline image (docker, else podman; DEVICE=gpu, TORCH_INDEX=, EXTRA_CA=; README "Container image")
	tools/image.sh build

image-check: ## build the image, then run the digits pipeline (dvc repro) and a Kubeflow component inside it
	tools/image.sh check

image-clean: ## remove the images that make image made
	tools/image.sh clean
