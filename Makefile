# The two set-up commands: `make demo` runs the built-in example, `make test` runs the tests.
# Each creates .venv on first use. torch is pinned here (a CPU build) so that pip does not
# fetch a multi-GB CUDA build, and torchvision to the release built for that torch; the package
# itself only asks for torch>=2.4 (and torchvision>=0.19 in its vision extra). The tests need the deploy extra
# (OpenVINO, ExecuTorch, LiteRT), so the set-up installs it; its tests skip, saying why, where it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0
TORCHVISION_PIN ?= torchvision==0.28.0
STAMP := $(VENV)/.slimkit-installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH_PIN)" "$(TORCHVISION_PIN)"
	$(BIN)/python -m pip install --quiet -e ".[dev,deploy]" "$(TORCH_PIN)" "$(TORCHVISION_PIN)"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/slimkit run recipes/deep-compression.yaml --out runs/demo --overwrite

# Test files spread over up to 4 processes (2 on a 2-core machine), each file whole in one (its fixtures built
# once); tests/conftest.py gives each process its share of the cores.
test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -n auto --maxprocesses 4 --dist loadfile --durations=15

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[dev,bench]"
	$(BIN)/python benchmarks/zoo.py
	$(BIN)/python benchmarks/prune.py
	$(BIN)/python benchmarks/quant.py
	$(BIN)/python benchmarks/deep_compression.py
	$(BIN)/python benchmarks/distill.py

clean:  # what the commands made and git ignores (committed benchmark results stay)
	git clean -fdX -- runs benchmarks/results
