# Quick start: `make run` (a local 3-node cluster and a demo VM on it) and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# make run's ports: nodes on BASE_PORT+i (data BASE_PORT+100+i), etcd on BASE_PORT+379/380;
# UP_ARGS passes more `sheep up` options (e.g. UP_ARGS=--no-restart)
BASE_PORT ?= 7000
NBD_PORT ?= 10809
ISCSI_PORT ?= 3260
UP_ARGS ?=

.PHONY: setup run test lint bench clean

setup:
	@bash scripts/setup.sh

run: setup
	$(VENV)/bin/sheep up --nodes 3 --copies 3 --dir ./var --vm --base-port $(BASE_PORT) \
		--nbd-port $(NBD_PORT) --iscsi-port $(ISCSI_PORT) $(UP_ARGS)

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q -ra --durations=25

lint: setup
	$(VENV)/bin/ruff check .

# the NBD comparison (sheep vs nbdkit vs qemu-nbd, + dog vdi write/read); options:
# make bench BENCH_ARGS='--seconds 5 --repeat 1'  (object level: python -m bench.objects)
bench: setup
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf var build *.egg-info .pytest_cache
