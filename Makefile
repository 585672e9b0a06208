# Two commands on a fresh clone: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP_BASE := $(VENV)/.installed-base
STAMP_DEV := $(VENV)/.installed-dev

.PHONY: demo tour detect-demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP_BASE): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(STAMP_DEV): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@ $(STAMP_BASE)

# The main job: train the demo recipe on the built-in digits data, in a fresh run directory.
demo: $(STAMP_BASE)
	$(BIN)/vitscale train --config configs/demo.yaml out_dir=runs/demo-$$(date +%Y%m%d-%H%M%S)

# Detection: the generated shapes set (runs/shapes), then a tiny ViT Faster R-CNN on it (~4 min).
detect-demo: $(STAMP_BASE)
	$(BIN)/python -m pip install --quiet -e ".[detection]"
	$(BIN)/python -m vitscale.detection.synthetic runs/shapes --images 32
	$(BIN)/vitscale detect train --config configs/detect-shapes.yaml \
		--data coco:runs/shapes/images,runs/shapes/annotations.json \
		out_dir=runs/detect-shapes-$$(date +%Y%m%d-%H%M%S)

# A tour of the model family: named sizes, variants, save / reload / resample.
tour: $(STAMP_BASE)
	$(BIN)/python -m vitscale.demo

test: $(STAMP_DEV)
	$(BIN)/python -m pytest -q

lint: $(STAMP_DEV)
	$(BIN)/ruff check src tests benchmarks

bench: $(STAMP_DEV)
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
