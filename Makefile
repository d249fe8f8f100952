# Two entry points: `make demo` (the main job) and `make test` (the test suite).
# Both create .venv when missing and install the package with a CPU build of torch.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test install bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PIN)
	$(BIN)/python -m pip install -q -e '.[dev,federated,serve,pacs]' $(TORCH_PIN)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/crosssite demo

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=20

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_data.py
	$(BIN)/python benchmarks/bench_model.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
