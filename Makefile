# The two commands of the README. Both install first (idempotent, scripts/install.sh).
.PHONY: install demo test lint

install:
	bash scripts/install.sh

demo: install
	bash scripts/demo.sh

test: install
	bash scripts/test.sh

lint: install
	.venv/bin/ruff format --check . && .venv/bin/ruff check .
