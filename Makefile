# The two commands of the README (`make demo`, `make test`) do their own set-up.
PYTHON ?= python3
NPROC ?= 2

.PHONY: install test test-fast demo lint docs bench clean

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

BENCH := MALLOC_MMAP_THRESHOLD_=65536 OMP_NUM_THREADS=1 $(PYTHON) -m torch.distributed.run \
	--standalone --nproc_per_node=$(NPROC)

bench: install
	$(BENCH) -m benchmarks.save_sync
	$(BENCH) -m benchmarks.save_async throughput
	$(BENCH) -m benchmarks.save_async stall
	$(PYTHON) -m benchmarks.dino_overhead

clean:
	rm -rf site demo_runs .pytest_cache
