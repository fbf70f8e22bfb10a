# Two entry points (see README Quickstart): `make demo` and `make test`.
.PHONY: demo test lint setup setup-dev clean

MANIFEST ?= manifests/examples/batch.csv
OUT ?= out/example

demo: setup
	.venv/bin/s2v-batch run $(MANIFEST) --out $(OUT)

test: setup-dev
	.venv/bin/ruff check .
	.venv/bin/python -m pytest

lint: setup-dev
	.venv/bin/ruff check .

setup:
	scripts/bootstrap.sh base

setup-dev:
	scripts/bootstrap.sh dev

clean:
	rm -rf out .pytest_cache
