# Quick start: `make run` (set up and start the node) and `make test` (set up and run every test).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
APT_PACKAGES := dcmtk dicom3tools orthanc orthanc-dicomweb chromium pixelmed-apps postgresql haproxy rsyslog rsyslog-gnutls jing

.PHONY: run demo test venv system-deps bench clean viewer ohif authserver

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and exactly pinned: the CPU wheel (any other spec pulls CUDA wheels)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

# Debian packages the tests use as real peers: dcmtk (storescu/echoscu/storescp),
# dicom3tools (dciodvfy), Orthanc with DICOMweb, pixelmed-apps (pixelmed's IOD and SR validators;
# apt brings the Java runtime it needs) and chromium (the console's browser tests, driven by
# Playwright; never `playwright install`) and postgresql (the replica tests start their own
# server in a temp folder as the postgres user) and haproxy (the replicas behind the DICOM load
# balancer of the compose profile), rsyslog with its TLS driver (the audit record repository of
# the ATNA tests) and jing (validates audit messages against PS3.15's RELAX NG schema).
# Installed only when missing.
# npm (for OHIF, and the OAuth 2.0 server of the tests, fetched by tests/authserver.py into
# build/authserver) only when no npm is on PATH: some images ship a nodejs that bundles its own npm,
# which Debian's npm package conflicts with.
system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	command -v npm >/dev/null 2>&1 || missing="$$missing nodejs npm"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

# Flags for the node: make run ARGS="--port 11114 --http-port 8081" (`dicom-node serve --help`)
run: venv
	$(BIN)/dicom-node serve --config config/node.yaml $(ARGS)

# In a second terminal while `make run` serves: a phantom study through the node and back (it
# finds the running node's port; make demo ARGS="--port N" names another).
demo: venv
	$(BIN)/dicom-node demo --config config/node.yaml $(ARGS)

test: venv system-deps ohif authserver
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=25

# The OHIF viewer (npm @ohif/app, prebuilt dist) for the viewer tests and `make viewer`:
# fetched once with npm into build/ohif (ignored by git) and kept between runs.
ohif: venv system-deps
	$(BIN)/python -m tests.viewer fetch

# The OAuth 2.0 authorization server of the tests (npm oidc-provider, from tests/authserver's lock
# file) into build/authserver, ignored by git and kept between runs.
authserver: venv system-deps
	$(BIN)/python -m tests.authserver

# While `make run` serves: Orthanc as the node's demo-viewer destination and OHIF in front of it
# (http://127.0.0.1:3000); sends a phantom study through the node and prints the viewer's link.
viewer: ohif
	$(BIN)/python -m tests.viewer up --demo

bench: venv system-deps
	$(BIN)/python -m benchmarks.receive

clean:
	rm -rf $(VENV) data .pytest_cache
