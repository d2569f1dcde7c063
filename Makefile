# bonn-sweep: the two commands of the README, and a few helpers.
# Every target creates .venv (CPU torch pinned) if it is missing.
PY := .venv/bin/python
PYTEST_FLAGS ?=

.PHONY: setup demo test test-fast test-integration down clean

setup:
	@bash scripts/setup.sh

## The main job: local Ray + MLflow + API, then a real BONN sweep on the offline digits data.
demo: setup
	@.venv/bin/bonn-sweep demo

## The whole test suite (unit + integration + e2e with real Ray, MLflow, SQLite, HTTP). CI runs this.
test: setup
	@bash scripts/run-tests.sh $(PYTEST_FLAGS)

## Unit tests only (seconds).
test-fast: setup
	@bash scripts/run-tests.sh -m "not integration and not e2e and not slow" $(PYTEST_FLAGS)

test-integration: setup
	@bash scripts/run-tests.sh -m "integration or e2e" $(PYTEST_FLAGS)

down: setup
	@.venv/bin/bonn-sweep down

clean:
	rm -rf .venv .bonn-sweep .pytest_cache
