# The README's two commands are `make demo` and `make test`; CI runs the same targets in a
# fresh virtual environment of its own (.ci/run sets PYTHON to that environment's python).
# Every tool runs as `$(PYTHON) -m ...`, so the targets use one environment and no PATH look-up.
PYTHON ?= python3
PIP = $(PYTHON) -m pip
# torch is pinned in the same pip command: resolved alone, pip pulls a multi-GB CUDA build.
TORCH = torch==2.13.0

.PHONY: install install-test demo test check browser dist dist-check

install:
	$(PIP) install $(TORCH) -e ".[demo]"

install-test:
	$(PIP) install $(TORCH) -e ".[dev]"
	$(MAKE) browser

# Debian's chromium drives the real-browser tests (Playwright's own browser download is not used).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { if command -v apt-get >/dev/null 2>&1; then \
	      (apt-get update -q && apt-get install -y -q chromium) >/dev/null; \
	    else echo "install chromium (or Chrome) and put it on PATH for the browser tests"; exit 1; fi; }

demo: install
	$(PYTHON) -m diffwidget.cli demo

test: install-test
	$(PYTHON) -m pytest

check:
	$(PYTHON) -m ruff format --check diffwidget tests bench hatch_build.py
	$(PYTHON) -m ruff check diffwidget tests bench hatch_build.py
	$(PYTHON) -m mypy
	cd js && { [ -d node_modules ] || npm ci --no-audit --no-fund; } && npx tsc --noEmit && npx biome check src test

# The wheel and the sdist in dist/ (both install without Node.js; building them needs the
# compiled front-end, which `make install` produces). RELEASING.md: build, check, publish.
dist:
	rm -rf dist
	$(PYTHON) -m build

# What CI checks about them: contents, a fresh venv without Node.js running `diffwidget demo
# --check`, and the message of a source build that has no Node.js.
dist-check:
	PYTHON=$(PYTHON) TORCH=$(TORCH) bash .ci/dist-check
