PY := .venv/bin/python
PIP := .venv/bin/pip

.PHONY: install test demo bench clean

install:
	python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	# torch first and pinned: this machine serves the CPU build from local disk; an open range would pull a CUDA build
	$(PIP) install -q "torch==2.13.0" || $(PIP) install -q "torch>=2.4"
	$(PIP) install -q -e ".[dev]"

test:
	$(PY) -m pytest

demo:
	$(PY) -m cpmgen.demo

bench:
	$(PY) benchmarks/bench_generate.py

clean:
	rm -rf .venv build *.egg-info
