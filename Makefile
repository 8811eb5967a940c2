PY := .venv/bin/python
PIP := .venv/bin/pip

.PHONY: install test test-fast demo bench bench-quality bench-peers bench-memory clean

# torch first and pinned: the CPU build is served from local disk here; an open range would pull a CUDA build
install:
	python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "torch==2.13.0" || $(PIP) install -q "torch>=2.4"
	# deepspeed: its launcher is tested (tests/test_parallel.py); it installs without CUDA. serve: cpmgen serve
	$(PIP) install -q -e ".[dev,deepspeed,serve]"
	# the C++ CPU kernels (cpmgen/kernels: int8/int4 linears, fp32/bf16 GEMV, attention, GELU, layer norm, the fused decode step);
	# where they do not build, the same work runs on slower torch operations with a warning
	$(PY) -m cpmgen.kernels

# every test, the slow ones too (torchrun and DeepSpeed launches, compiles, long generations)
test:
	$(PY) -m pytest

# the quick loop: the tests not marked slow
test-fast:
	$(PY) -m pytest -m "not slow"

# lyric and novel end to end on the small trained CPM-1 shipped in models/cpm-tiny (seconds, CPU);
# the novel writes on past end of text for 400 tokens, moving its 127-token window several times
demo:
	.venv/bin/cpmgen lyric -m models/cpm-tiny examples/lyric.txt --lines 4 -n 120 -s 2
	.venv/bin/cpmgen novel -m models/cpm-tiny examples/novel.txt --ignore-eos -n 400 -s 1

bench:
	$(PY) benchmarks/bench_generate.py

# cpmgen against transformers, CTranslate2 and llama.cpp on the same weights (JSON, a table);
# llama-cpp-python compiles llama.cpp from source on first install (about 10 minutes)
bench-peers:
	$(PIP) install -q -e ".[peers]"
	$(PY) benchmarks/bench_peers.py

# peak RSS of loading and generating with CPM-Large's shape, --quantize int8/int4 and cpmgen quantize folders
# (JSON; writes a 5.2 GB random checkpoint into the bench cache once, and needs about 11 GB of memory)
bench-memory:
	$(PY) benchmarks/bench_memory.py

# perplexity and tokens/s against stride on the trained cpm-tiny (JSON, a table, benchmarks/results/quality.png)
bench-quality:
	$(PIP) install -q -e ".[bench]"
	$(PY) benchmarks/bench_quality.py

clean:
	rm -rf .venv build *.egg-info cpmgen/kernels/*.so

.PHONY: tiny-model
# Train models/cpm-tiny (about 20 minutes on 2 idle CPU cores, longer on a busy machine); see models/cpm-tiny/TRAINING.md
tiny-model:
	$(PIP) install -q -e ".[train]"
	$(PY) tools/train_tiny.py
