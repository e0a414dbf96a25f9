# The README's commands. `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned so pip takes the local CPU wheel on CPU machines instead of pulling CUDA packages.
TORCH_VERSION ?= 2.13.0

.PHONY: venv demo test lint bench clean

$(BIN)/llamita: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "torch==$(TORCH_VERSION)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(BIN)/llamita

venv: $(BIN)/llamita

demo: venv
	$(BIN)/llamita demo --out runs/demo

test: venv
	$(BIN)/ruff check src tests
	$(BIN)/python -m pytest -q --durations=10

lint: venv
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache
