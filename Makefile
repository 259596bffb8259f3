# Two commands on a fresh machine: `make run` (set up + default experiment), `make test`.
PYTHON ?= python3
VENV ?= .venv
# `make install EXTRAS=gpu,test` swaps faiss-cpu for faiss-gpu (never both in one env).
EXTRAS ?= cpu,test
# all = this host's cores: more concurrent jobs than cores only makes them slower.
CORES ?= all
BIN := $(VENV)/bin
# Snakemake loads the local profile from profiles/default (a link to workflow/profiles/default).
SMK := $(BIN)/snakemake

.PHONY: install run test lint report bench-peer clean
install: $(VENV)/.installed-$(EXTRAS)

$(VENV)/.installed-$(EXTRAS): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[$(EXTRAS)]"
	rm -f $(VENV)/.installed-*
	touch $@

run: install
	$(SMK) --cores $(CORES) results/linear_eval.csv

test: install
	$(BIN)/python -m pytest -q tests

lint: install
	$(BIN)/ruff check pipeline tests bench
	$(BIN)/snakemake --lint

# The card's target builds the tables and every figure the report shows; the report goes
# into the experiment's own folder: `make report CONFIG=experiments/mine/config.yaml`.
CONFIG ?= config.yaml
report: install
	$(SMK) --cores $(CORES) results/linear_eval.csv --configfile $(CONFIG)
	$(SMK) --report "$$($(BIN)/python -m pipeline experiment-dir $(CONFIG))/report.html" \
		--configfile $(CONFIG)

# The side-by-side against lightly: the optional `peer` extra, never needed by run or test.
bench-peer: install
	$(BIN)/python -c "import lightly" 2>/dev/null || \
		$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[$(EXTRAS),peer]"
	$(BIN)/python bench/bench_lightly.py --epochs 20 --threads 2

clean:
	rm -rf results .snakemake
