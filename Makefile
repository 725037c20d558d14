# famsearch — the two commands of the README.
#   make run [PHOTOS=~/Pictures] [PORT=8501]   set up .venv, index (a demo gallery by default), open the UI
#   make test                                   set up .venv with the test tools; lint (ruff), types (mypy), the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PHOTOS ?=
PORT ?= 8501
HOME_DIR ?=
HOME_FLAG := $(if $(HOME_DIR),--home $(HOME_DIR),)

.PHONY: run test setup clean-venv

run: $(VENV)/.installed
	$(BIN)/famsearch index $(if $(PHOTOS),$(PHOTOS),--demo) $(HOME_FLAG)
	$(BIN)/famsearch ui --port $(PORT) $(HOME_FLAG)

test: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n auto  # one process per core, one torch thread each

setup: $(VENV)/.installed

# torch/torchvision first, pinned: this pair installs from the machine's local wheels.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --disable-pip-version-check -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install --disable-pip-version-check -q -e ".[test]"
	touch $@

clean-venv:
	rm -rf $(VENV)
