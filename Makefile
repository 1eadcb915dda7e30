# The two commands of the README. Both set everything up first (venv, torch, interp, the embedded model).
.PHONY: demo test setup bench

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/interp scan

test: setup
	.venv/bin/python -m pytest tests --durations=25

bench: setup
	.venv/bin/python bench/capture.py
