# Every target creates (once) and reuses the virtual environment in .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: venv system-packages serve orthanc demo test benchmark clean

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

# Debian packages the PACS tests and `make orthanc` need: Orthanc with DICOMweb, and the
# headless browser (with its WebDriver) that checks the OHIF viewer. Installed when missing.
SYSTEM_PACKAGES := orthanc orthanc-dicomweb chromium chromium-driver
system-packages:
	@if test -x /usr/sbin/Orthanc && test -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so \
	    && command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; else \
	  echo "installing $(SYSTEM_PACKAGES)"; \
	  apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
	    --no-install-recommends $(SYSTEM_PACKAGES) >/dev/null; fi

# A private Orthanc PACS (DICOMweb at http://127.0.0.1:$(ORTHANC_PORT)/dicom-web, storage in
# runs/orthanc) until Ctrl-C; serve it with `make serve STUDIES=http://127.0.0.1:8042/dicom-web`.
ORTHANC_PORT ?= 8042
orthanc: $(STAMP) system-packages
	$(BIN)/tact orthanc --dir runs/orthanc --port $(ORTHANC_PORT)

# The main job: the MONAI Label app on embedded studies (phantoms and the real sample,
# simulated once into runs/serve) with the committed demo models, on $(HOST):$(PORT).
# STUDIES=<folder or DICOMweb URL> serves those instead of the embedded studies.
serve: $(STAMP)
	$(BIN)/tact serve --host $(HOST) --port $(PORT) $(if $(STUDIES),--studies $(STUDIES))

# The classical pipeline on the real 20-slice sample at N0 = 4096: FBP, BM3D, report.
demo: $(STAMP)
	$(BIN)/tact demo --out runs/demo

test: $(STAMP) system-packages
	$(BIN)/python -m pytest -q tests

benchmark: $(STAMP)
	$(BIN)/python benchmarks/simulate.py

clean:
	rm -rf runs .pytest_cache
