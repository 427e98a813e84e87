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
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,perf]'
	touch $@

setup: $(VENV)/.installed system-deps

# perf_analyzer needs libb64 from Debian; everything else comes from pip.
system-deps:
	@dpkg -s libb64-0d >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get install -y -qq libb64-0d >/dev/null 2>&1 || \
	    { apt-get update -qq >/dev/null && apt-get install -y -qq libb64-0d >/dev/null; }; \
	  else echo "note: perf_analyzer needs libb64-0d: sudo apt-get install libb64-0d"; fi; }

quickstart: setup
	$(VENV)/bin/headmaster quickstart

test: setup
	$(PY) -m pytest

benchmark: setup
	$(PY) benchmarks/serve_throughput.py
