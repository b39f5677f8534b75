# The two set-up commands of the README.
.PHONY: up test lint bench

up:  ## install into .venv and run everything on embedded defaults
	scripts/bootstrap.sh
	.venv/bin/llmtap up

test:  ## the whole test suite, starting the services it needs
	scripts/test.sh

lint:
	.venv/bin/ruff check src tests bench && .venv/bin/mypy

bench:
	.venv/bin/python bench/bench_gateway.py
