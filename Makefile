# Developer shortcuts; each target is one call to scripts/ or .venv/bin/ (ruff comes from the dev requirements).
.PHONY: setup lint format test-fast test-parity test-e2e test

setup:
	bash scripts/setup.sh

lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

format:
	.venv/bin/ruff format . && .venv/bin/ruff check --fix .

test-fast:
	bash scripts/test.sh -m "not slow and not parity and not e2e"

test-parity:
	bash scripts/test.sh -m parity

test-e2e:
	bash scripts/test.sh -m e2e

test:
	bash scripts/test.sh
