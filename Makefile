# ptychostream: `make demo` runs the whole loop on simulated data, `make test` runs the tests.
# Both create .venv on first use and install what they need; later runs are quick.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
STAMP  := $(VENV)/.installed
EXTRAS ?= all,test

.PHONY: demo demo-quick test bench lint clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' Makefile | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml setup.cfg
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing torch + torchvision (together, so they match; about 5 GB the first time)"
	$(PIP) install -q torch torchvision 2>&1 | grep -v "is ignored" || true
	@$(PY) -c "import torch, torchvision" || { echo "torch/torchvision install failed"; exit 1; }
	$(PIP) install -q -e '.[$(EXTRAS)]' 2>&1 | grep -v "is ignored" || true
	@$(PY) -c "import ptychostream, p4p, pvaccess, caproto, bluesky, ophyd, ptychi, onnxruntime" \
		|| { echo "package install failed"; exit 1; }
	@touch $(STAMP)

demo: $(STAMP)  ## run the whole loop on simulated data (about 4 minutes on 2 cores)
	$(VENV)/bin/ptychostream demo

demo-quick: $(STAMP)  ## the same story, small (under a minute)
	$(VENV)/bin/ptychostream demo --quick

test: $(STAMP)  ## run the test suite
	$(PY) -m pytest

bench: $(STAMP)  ## inference and map-stage timing tables (writes bench-results/*.json)
	$(PY) benchmarks/bench_inference.py --json bench-results/inference.json
	$(PY) benchmarks/bench_stitch.py --json bench-results/stitch.json

lint: $(STAMP)  ## ruff
	$(VENV)/bin/ruff check .

clean:  ## remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
