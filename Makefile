# The two commands of the README (`make demo`, `make test`) do their own set-up.
PYTHON ?= python3
STAMP := .make/installed
NPROC ?= 2

.PHONY: install test demo lint docs bench clean

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install.sh
	bash scripts/install.sh $(PYTHON)
	@mkdir -p $(dir $@) && touch $@

test: install
	$(PYTHON) -m pytest -n auto -q tests

demo: install
	PYTHON=$(PYTHON) bash launch/demo.sh

lint: install
	$(PYTHON) -m ruff check dcp_engine tests benchmarks launch
	$(PYTHON) -m ruff format --check dcp_engine
	$(PYTHON) -m mypy dcp_engine

docs: install
	$(PYTHON) -m pip install -q -e ".[docs]"
	$(PYTHON) -m mkdocs build --strict

bench: install
	$(PYTHON) -m torch.distributed.run --standalone --nproc_per_node=$(NPROC) -m benchmarks.save_sync

clean:
	rm -rf .make site demo_runs .pytest_cache
