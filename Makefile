# The two commands of the README (`make demo`, `make test`) do their own set-up.
PYTHON ?= python3
NPROC ?= 2

.PHONY: install test test-fast demo lint docs bench bench-deps bench-save bench-load bench-remote bench-dino clean

# Always checked (fast when nothing is missing): a stamp file would survive a move of the
# checkout or an install of another clone, and leave `import dcp_engine` broken.
install:
	@bash scripts/install.sh $(PYTHON)

test: install
	$(PYTHON) -m pytest -n auto -q tests

test-fast: install  # without the end-to-end runs marked slow (torchrun, DINO, the kill loop)
	$(PYTHON) -m pytest -n auto -q -m "not slow" tests

demo: install
	PYTHON=$(PYTHON) bash launch/demo.sh

lint: install
	$(PYTHON) -m ruff check dcp_engine tests benchmarks launch
	$(PYTHON) -m ruff format --check dcp_engine
	$(PYTHON) -m mypy dcp_engine

docs: install
	$(PYTHON) -m pip install -q -e ".[docs]"
	$(PYTHON) -m mkdocs build --strict

# make bench: dcp-engine next to torch.save, dcp.save, dcp.async_save and the floors, in one
# run per figure; JSON + Markdown + PNG in benchmarks/results/ (summary.md: the headlines).
# BENCH_MIB: MiB per rank asked of the save/load state (512 gives the issue's 504 MiB;
# 256 keeps the whole target near 10 minutes on 2 cores). Medians of BENCH_REPS saves.
BENCH_MIB ?= 256
BENCH_REPS ?= 5
DINO_REPS ?= 2
DINO_STEPS ?= 24
# bench-remote: one process against a loopback S3 server (moto), MiB and rounds of its own
REMOTE_MIB ?= 128
REMOTE_REPS ?= 3
BENCH_ENV := MALLOC_MMAP_THRESHOLD_=65536 OMP_NUM_THREADS=1
BENCH := $(BENCH_ENV) $(PYTHON) -m torch.distributed.run --standalone --nproc_per_node=$(NPROC)
BENCH1 := $(BENCH_ENV) $(PYTHON) -m torch.distributed.run --standalone --nproc_per_node=1

bench: bench-save bench-load bench-dino bench-remote
	$(PYTHON) -m benchmarks.summary

bench-deps: install  # the `bench` extra (matplotlib, for the PNGs), alone: pip never touches torch
	@$(PYTHON) -c "import matplotlib" 2>/dev/null || $(PYTHON) -m pip install -q "matplotlib>=3.5"

bench-save: bench-deps  # figures 1-4: a sharded state on NPROC ranks, many small tensors on 1
	$(BENCH) -m benchmarks.save_async throughput --mib-per-rank $(BENCH_MIB) --reps $(BENCH_REPS)
	$(BENCH1) -m benchmarks.save_async throughput --shape small --reps $(BENCH_REPS)

bench-load: bench-deps  # figure 5
	$(BENCH) -m benchmarks.load --mib-per-rank $(BENCH_MIB) --reps $(BENCH_REPS)

bench-remote: bench-deps  # figure 7: S3 on a loopback moto server (ratios only; not S3)
	$(BENCH_ENV) $(PYTHON) -m benchmarks.remote --mib $(REMOTE_MIB) --reps $(REMOTE_REPS)

bench-dino: bench-deps  # figure 6
	$(PYTHON) -m benchmarks.dino_overhead --reps $(DINO_REPS) --steps $(DINO_STEPS)

clean:
	rm -rf site demo_runs .pytest_cache
