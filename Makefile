PYTHON ?= python3

.PHONY: run test lint setup bench

# Set up, then answer one prompt with the default model (SmolLM2-135M-Instruct).
run:
	bash scripts/setup.sh
	$(PYTHON) -m kvos.entrypoints.cli generate --chat-template "Explain what a KV cache is in two sentences."

# Set up with the test dependencies, then run the whole suite.
test:
	bash scripts/setup.sh test
	$(PYTHON) -m pytest -q

# ruff (lint and format) and mypy over the package, as CI runs them.
lint:
	bash scripts/setup.sh test
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m mypy

bench:
	bash scripts/setup.sh test
	$(PYTHON) -m benchmarks.offline_throughput
