# Quick start: `make run` (a local 3-node cluster and a demo VM on it) and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup run test lint bench clean

setup:
	@bash scripts/setup.sh

run: setup
	$(VENV)/bin/sheep up --nodes 3 --copies 3 --dir ./var --vm

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q -ra

lint: setup
	$(VENV)/bin/ruff check .

# the NBD comparison (sheep vs nbdkit vs qemu-nbd, + dog vdi write/read); options:
# make bench BENCH_ARGS='--seconds 5 --repeat 1'  (object level: python -m bench.objects)
bench: setup
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf var build *.egg-info .pytest_cache
