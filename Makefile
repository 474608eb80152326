# The two commands of the README: `make run` (MNIST pipeline end to end) and `make test`.
# Both create .venv from requirements.lock on first use; nothing else needs installing by hand.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
UV_VERSION := 0.13.9
# GPU=1 installs TensorFlow's CUDA build (requirements-gpu.lock) in place of tensorflow-cpu; by default where
# nvidia-smi lists a GPU. Switching either way makes .venv exactly the other lock (uv pip sync).
GPU ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
LOCK := $(if $(filter 1,$(GPU)),requirements-gpu.lock,requirements.lock)
# The byte-exact MNIST files when they sit beside the checkout; else TFDS's own download.
MNIST_DATA ?= $(if $(wildcard ../shared/data/mnist/train-images-idx3-ubyte.gz),../shared/data/mnist,)
RUN_ARGS ?=

.PHONY: run test bench install clean

install: $(VENV)/.installed-$(LOCK)

$(VENV)/.installed-$(LOCK): $(LOCK) pyproject.toml
	@command -v uv >/dev/null 2>&1 || $(PYTHON) -m pip install -q "uv==$(UV_VERSION)"
	uv venv -q --allow-existing --python $(PYTHON) $(VENV)
	uv pip sync -q --python $(BIN)/python --compile-bytecode $(LOCK)
	uv pip install -q --python $(BIN)/python --no-deps -e .
	@rm -f $(VENV)/.installed $(VENV)/.installed-*
	@touch $@

run: install
	$(BIN)/digits run train-mnist $(if $(MNIST_DATA),--data $(MNIST_DATA)) $(RUN_ARGS)

test: install
	$(BIN)/python -m pytest -n 2 --dist load

bench: install
	$(BIN)/python -m pytest -m benchmark -s tests/benchmarks

clean:
	rm -rf $(VENV)
