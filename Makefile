# Two entry points for a newcomer: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test lint demo clean clean-demo lowest newest

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

# The dependency floors: installs the lowest versions pyproject.toml allows (uv's lowest-direct
# resolution) into $(LOWEST) and runs a smoke test over every dependency. Downloads ~1 GB, so it
# is not part of `make test`; run it after changing a floor.
LOWEST := .venv-lowest
LOWEST_TESTS := tests/test_house.py \
	tests/test_training.py::test_train_step_updates_params_and_batch_stats \
	tests/test_training.py::test_non_finite_loss_stops_and_keeps_last_good_checkpoint \
	tests/test_pretrained.py::test_reads_npz_and_safetensors \
	tests/test_predict.py::test_predictor_from_workdir_and_evaluate_run \
	tests/test_builders.py::test_cli_prepares_and_reports

lowest:
	test -x $(LOWEST)/bin/python || $(PYTHON) -m venv $(LOWEST)
	$(LOWEST)/bin/python -m pip install --quiet uv
	$(LOWEST)/bin/uv pip install --quiet --python $(LOWEST)/bin/python --resolution lowest-direct \
		-e ".[test]"
	$(LOWEST)/bin/python -m pip list --format=freeze > $(LOWEST)/versions.txt
	$(LOWEST)/bin/python -m pytest -n 0 -p no:cacheprovider $(LOWEST_TESTS)

# The newest releases: the whole suite in $(NEWEST), on the newest versions pip finds for
# $(PYTHON). jax 0.11 needs Python >= 3.12 (on 3.11 pip stops at 0.10), so run it as
# `make newest PYTHON=python3.12`; also not part of `make test`.
NEWEST := .venv-newest

newest:
	test -x $(NEWEST)/bin/python || $(PYTHON) -m venv $(NEWEST)
	$(NEWEST)/bin/python -m pip install --quiet --upgrade pip
	$(NEWEST)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[test]"
	$(NEWEST)/bin/python -m pip list --format=freeze > $(NEWEST)/versions.txt
	$(NEWEST)/bin/python -m pytest -n auto --maxschedchunk 1

clean-demo:
	rm -rf workdirs/demo

clean:
	rm -rf $(VENV) $(LOWEST) $(NEWEST) .pytest_cache .ruff_cache
