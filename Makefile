# Everything a fresh machine needs: `make demo` and `make test` do all the set-up themselves.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
FASHION_DIR := /usr/share/datasets/fashion-mnist
DEMO_DATA := data/fashion_mnist

.PHONY: venv demo demo-data test test-fast bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test,export]'
	touch $(STAMP)

# Debian ships the original Fashion-MNIST files; converted once into an image folder.
$(FASHION_DIR)/train-images-idx3-ubyte.gz:
	@if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	else sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist; fi

demo-data: venv $(FASHION_DIR)/train-images-idx3-ubyte.gz
	$(PY) -m jtl.data.demo --out $(DEMO_DATA)

demo: demo-data
	$(PY) -m jtl.main --config configs/partial_ft.py --workdir runs/demo

test: venv
	$(PY) -m pytest -q -p no:cacheprovider -n auto --dist loadfile --durations=25 tests

# The unit tests alone (markers in tests/conftest.py): no training runs, no child processes.
test-fast: venv
	$(PY) -m pytest -q -p no:cacheprovider -n auto --dist loadfile -m fast tests

bench: venv
	$(VENV)/bin/pip install -q -e '.[test,bench]'
	$(PY) bench/run.py
	$(PY) bench/vit_forward.py

clean:
	rm -rf runs
