# Fresh machine: `make demo` (main job) and `make test` (test suite) do all the set-up.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint clean bench-setup encoders-setup

# torch first (the local CPU wheel), then everything else under the constraints file,
# so that no dependency can pull a CUDA build of torch.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/distillery run

# pytest exits 5 when it collects no test: that is a broken suite, not a pass.
# One BLAS/OpenMP thread per process: the tests use tiny tensors, and the data-parallel tests run
# two processes on two cores, where extra threads only oversubscribe the CPU.
test: setup
	$(VENV)/bin/lint-imports --no-logo
	@OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi; \
	exit $$rc

# The benchmark-only extra (TRL, for benchmarks/trl_comparison.py) and the sentence encoders
# (all-MiniLM-L6-v2, sentence-transformers), under the same constraints.
bench-setup: setup
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev,bench,encoders]"

encoders-setup: setup
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev,encoders]"

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/lint-imports --no-logo

clean:
	rm -rf $(VENV) runs .pytest_cache
