# Every target creates or reuses .venv itself: torch first (the local CPU build, exact pin),
# then the project with its dev, docs and integrations extras, then torchtitan. Nothing else needs to be
# installed beforehand.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.ckptio-installed

.PHONY: venv demo test lint format docs bench bench-quick stress mutate clean

venv: $(STAMP)

# torchtitan goes in without its dependencies: its datasets<4.8 pin would take fsspec below s3fs's (the
# integrations extra lists what it imports)
$(STAMP): pyproject.toml ckptio/version.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[dev,docs,integrations]'
	$(PY) -m pip install -q --no-deps 'torchtitan==0.3.0'
	touch $@

demo: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash launch/demo.sh

test: $(STAMP)
	$(PY) -m pytest -n auto -q

# the documentation site (docs/, mkdocs.yml) into site/, strict: a broken link, reference or docstring fails it
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	$(PY) -m benchmarks --out bench-out

stress: $(STAMP)
	$(PY) -m pytest -q -n auto tests/test_crash.py tests/test_faults.py tests/test_reference.py \
		tests/test_torchrun.py::test_the_main_job_leaves_cleanly_every_time \
		tests/test_torchrun.py::test_ranks_leave_together_at_close_without_a_barrier_of_their_own --stress

# every mutant of tests/mutants.py against the tests it names (outside make test: about 20 minutes here)
mutate: $(STAMP)
	$(PY) tests/mutate.py

clean:
	rm -rf runs bench-out .pytest_cache site
