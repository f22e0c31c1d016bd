# Every target creates (once) and reuses the virtual environment in .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: venv serve demo test benchmark clean

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

# The main job: the MONAI Label app on embedded studies (phantoms and the real sample,
# simulated once into runs/serve) with the committed demo models, on $(HOST):$(PORT).
serve: $(STAMP)
	$(BIN)/tact serve --host $(HOST) --port $(PORT)

# The classical pipeline on the real 20-slice sample at N0 = 4096: FBP, BM3D, report.
demo: $(STAMP)
	$(BIN)/tact demo --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

benchmark: $(STAMP)
	$(BIN)/python benchmarks/simulate.py

clean:
	rm -rf runs .pytest_cache
