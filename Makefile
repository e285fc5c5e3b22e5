# The two commands a newcomer runs on a fresh machine: `make demo` and `make test`.
# Each creates .venv when missing and installs the project into it, at the versions pinned in
# constraints.txt (the resolved set CI tested), so a fresh machine gets what passed, not whatever
# was released this morning. pyproject.toml keeps ranges for library users; `make test-latest`
# runs the suite against the newest versions those ranges allow, and `make lock` re-pins.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LATEST_VENV ?= .venv-latest
CONSTRAINTS ?= constraints.txt
EXTRAS ?= test,interop
OUT ?= out/demo

.PHONY: demo test test-latest lock bench simulate clean browser

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e '.[$(EXTRAS)]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/streamclust demo --out $(OUT)

test: $(VENV)/.installed browser
	$(PY) -m pytest -q

# The same suite against the newest releases pyproject.toml allows (no constraints, upgraded every
# time): a new release that breaks us shows up here as such, not as a flaky test in `make test`.
test-latest: browser
	test -x $(LATEST_VENV)/bin/python || $(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e '.[$(EXTRAS)]'
	$(LATEST_VENV)/bin/python -m pip freeze --exclude-editable > $(LATEST_VENV)/versions.txt
	$(LATEST_VENV)/bin/python -m pytest -q

# Re-pin: resolve the extras in a clean venv and freeze the result (then run `make test`, commit).
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet --upgrade pip
	.venv-lock/bin/python -m pip install --quiet -e '.[$(EXTRAS)]'
	{ echo "# Pinned versions for \`make test\` / \`make demo\` (pip install -c $(CONSTRAINTS)); regenerate with \`make lock\`."; \
	  echo "# $$(.venv-lock/bin/python --version), resolved from pyproject.toml's [$(EXTRAS)] on $$(date -u +%F)."; \
	  .venv-lock/bin/python -m pip freeze --exclude-editable; } > $(CONSTRAINTS)
	rm -rf .venv-lock

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
	rm -rf $(VENV) $(LATEST_VENV) out .pytest_cache
