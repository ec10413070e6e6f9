# Two commands on a fresh machine: `make demo` and `make test`. Both create or reuse .venv/.
VENV := .venv
PYTHON := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
DEMO_DIR := demo

.PHONY: demo test benchmark clean

$(INSTALLED): setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	# Pinned: an unpinned torch resolves to gigabytes of CUDA packages on a CPU machine.
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e '.[test,learned]'
	touch $(INSTALLED)

demo: $(INSTALLED)
	$(PYTHON) benchmarks/demo.py $(DEMO_DIR)

test: $(INSTALLED)
	$(PYTHON) -m pytest -q tests

benchmark: $(INSTALLED)
	$(PYTHON) benchmarks/pipeline_benchmark.py --out benchmarks/RESULTS.md

clean:
	rm -rf $(VENV) $(DEMO_DIR) *.egg-info
