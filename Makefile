# The two commands a newcomer runs on a fresh machine: `make demo` and `make test`.
# Each creates .venv when missing and installs the project into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= out/demo

.PHONY: demo test bench simulate clean browser

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/streamclust demo --out $(OUT)

test: $(VENV)/.installed browser
	$(PY) -m pytest -q

# The live view is tested in a real headless Chromium (Debian's package). Installed when missing and
# we may (root with apt-get, as on CI); otherwise that one test skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium for the live-view browser test"; \
	    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium missing and not installable here: the browser test will be skipped"; fi; }

bench: $(VENV)/.installed
	$(PY) benchmarks/run_all.py

simulate: $(VENV)/.installed
	$(VENV)/bin/streamclust simulate

clean:
	rm -rf $(VENV) out .pytest_cache
