# Two commands do all set-up on a fresh machine with Python 3.11:
#   make chat   - create .venv, install promoe, chat with the bundled model
#   make test   - create .venv, install promoe with test tools, run the test suite
# On a CUDA machine pick the torch build you want, e.g.
#   make chat TORCH_INDEX=https://download.pytorch.org/whl/cu128

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
TORCH_INDEX ?=
BIN    := $(VENV)/bin

.PHONY: setup chat test lint clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

setup: $(BIN)/.installed

chat: setup
	$(BIN)/promoe chat

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
