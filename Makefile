PYTHON ?= python3

.PHONY: run test setup bench

# Set up, then answer one prompt with the default model (SmolLM2-135M-Instruct).
run:
	bash scripts/setup.sh
	$(PYTHON) -m kvos.entrypoints.cli generate --chat-template "Explain what a KV cache is in two sentences."

# Set up with the test dependencies, then run the whole suite.
test:
	bash scripts/setup.sh test
	$(PYTHON) -m pytest -q

bench:
	bash scripts/setup.sh test
	$(PYTHON) -m benchmarks.offline_throughput
