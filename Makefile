# Two commands do all set-up on a fresh machine (only Python 3.11 needed):
#   make run    create .venv, install CPU torch + nsaconf, run the default CPU matrix, write the HTML report
#   make test   create .venv if needed, run the test suite
PYTHON ?= python3.11
VENV   ?= .venv
PY      = $(VENV)/bin/python
OUT    ?= out/run
PROFILE ?= ci
TORCH_VERSION ?= 2.13.0

.PHONY: setup run test bench-memory clean

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU torch first (a bare `torch` would resolve to a multi-GB CUDA build)
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	# nsaconf with the pinned external oracles it judges in CI ([oracles]) and the test tools ([test])
	$(PY) -m pip install -q -e ".[oracles,test]"
	@touch $@

setup: $(VENV)/.installed

# nsaconf exits 1 when a cell FAILed/ERRORed: those are conformance findings, listed in the report;
# exit 2 (bad input) or a crash still fails `make run`
run: setup
	$(VENV)/bin/nsaconf run --profile $(PROFILE) --device cpu --out $(OUT) || test $$? -eq 1

test: setup
	$(PY) -m pytest -q

# time and peak RSS of the float64 reference alone and of `nsaconf run --oracles reference` (parent + worker) per T
SEQ_LENS ?= 4096,8192,16384,32768,65536
bench-memory: setup
	$(PY) benchmarks/reference_memory.py --seq-lens $(SEQ_LENS)

clean:
	rm -rf $(VENV) out .pytest_cache .hypothesis
