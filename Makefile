# The two commands of the README: `make run` (MNIST pipeline end to end) and `make test`.
# Both create .venv from requirements.lock on first use; nothing else needs installing by hand.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
UV_VERSION := 0.13.9
# The byte-exact MNIST files when they sit beside the checkout; else TFDS's own download.
MNIST_DATA ?= $(if $(wildcard ../shared/data/mnist/train-images-idx3-ubyte.gz),../shared/data/mnist,)
RUN_ARGS ?=

.PHONY: run test bench install clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.lock pyproject.toml
	@command -v uv >/dev/null 2>&1 || $(PYTHON) -m pip install -q "uv==$(UV_VERSION)"
	uv venv -q --allow-existing --python $(PYTHON) $(VENV)
	uv pip install -q --python $(BIN)/python --compile-bytecode -r requirements.lock
	uv pip install -q --python $(BIN)/python --no-deps -e .
	@touch $@

run: install
	$(BIN)/digits run train-mnist $(if $(MNIST_DATA),--data $(MNIST_DATA)) $(RUN_ARGS)

test: install
	$(BIN)/python -m pytest -n 2 --dist load

bench: install
	$(BIN)/python -m pytest -m benchmark -s tests/benchmarks

clean:
	rm -rf $(VENV)
