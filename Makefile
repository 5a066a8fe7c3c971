# Two commands do all the set-up: `make demo` runs the main job, `make test` the tests.
# Each creates the virtual environment it needs in .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench clean-venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip
	$(VENV)/bin/pip install -e '.[dev,parallel,slurm,mlflow,tensorboard]'  # the trackers' tests read their stores
	touch $@

demo: $(VENV)/.installed
	$(PY) -m ablate.demo $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest

bench: $(VENV)/.installed
	$(PY) -m ablate.bench

clean-venv:
	rm -rf $(VENV)
