# Every target creates (once) and reuses the virtual environment in .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test benchmark clean

venv: $(STAMP)

# sam2 (pulled in by monailabel for its SAM2 tasks, which the app does not use) ships a
# top-level package named `training` that would shadow this project's: it is removed.
$(STAMP): requirements.txt constraints.txt setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -r requirements.txt -c constraints.txt
	$(BIN)/python -m pip uninstall --quiet --yes sam2
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# The main job on the embedded default: the real 20-slice sample at N0 = 4096.
demo: $(STAMP)
	$(BIN)/tact demo --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

benchmark: $(STAMP)
	$(BIN)/python benchmarks/simulate.py

clean:
	rm -rf runs .pytest_cache
