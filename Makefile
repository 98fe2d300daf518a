# tomoscribe: the two commands a user needs are `make demo` and `make test`.
# Each installs whatever is missing first (scripts/setup.sh, idempotent).
SHELL := /bin/bash
PY := .venv/bin/python

.PHONY: setup test lint demo stop train bench sample

setup:
	@bash scripts/setup.sh

## test: install what is missing, then lint, type-check and run every test
test: setup
	$(PY) -m ruff check tomoscribe operators plugin tests benchmarks
	$(PY) -m mypy
	$(PY) -m pytest -q -ra --durations=15

lint: setup
	$(PY) -m ruff check tomoscribe operators plugin tests benchmarks
	$(PY) -m mypy

## demo: start Orthanc with tomoscribe on localhost, send the sample study, print the report
demo: setup
	@bash scripts/demo.sh start

## stop: stop the demo Orthanc
stop:
	@bash scripts/demo.sh stop

## train: retrain the shipped default model (see README for the cost)
train: setup
	$(PY) -m tomoscribe.train --out tomoscribe/weights --checkpoint checkpoints/default \
		--samples 1200 --steps 3000 --minutes 85 --batch 4 --lm-start 150 --save-every 50

## bench: accuracy of the shipped model vs an image-blind baseline on held-out phantoms
bench: setup
	$(PY) benchmarks/accuracy.py

## sample: (re)generate the sample phantom study under samples/
sample: setup
	$(PY) -m tomoscribe.phantom --seed 9 --out samples/phantom-ct
