# The two commands of the README. Both create .venv/ on first use.
#   make quickstart   export -> repository -> serve -> classify real photos -> print labels
#   make test         the test suite (a real Triton server, real models, real images)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup system-deps quickstart test benchmark

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,perf,postgres,ray,queue]'
	touch $@

setup: $(VENV)/.installed system-deps

# From Debian: libb64 for perf_analyzer, Chromium to render the HTML review page in tests,
# a PostgreSQL server for the store's PostgreSQL backend, a Redis server for the queue workers.
# Everything else comes from pip.
DEBIAN_PACKAGES := libb64-0d chromium postgresql redis-server
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

benchmark: setup
	$(PY) benchmarks/serve_throughput.py
	$(PY) benchmarks/rescore_store.py
