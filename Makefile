# Two entry points for a newcomer: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test lint demo clean clean-demo

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -n auto --maxschedchunk 1

# Trains ESS on the built-in 1284-class synthetic set (configs/synthetic.py) and prints the
# validation mIoU. A rerun resumes from workdirs/demo; `make clean-demo` starts over.
demo: venv
	$(BIN)/python -m jaxscaleseg.train --config configs/synthetic.py --workdir workdirs/demo

clean-demo:
	rm -rf workdirs/demo

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
