# vmbalance — every target installs what it needs first (Debian 12, root or sudo).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# uv, pinned and hash-checked in requirements/uv.txt, installs the exact versions in uv.lock.
TOOLS := .tools
UV := $(TOOLS)/bin/uv
SYNC := UV_PROJECT_ENVIRONMENT=$(VENV) $(UV) sync --locked --quiet --compile-bytecode --python $(PYTHON) --extra libvirt --extra recommender

# Debian packages: python build basics, the real servers the tests run, libvirt headers for
# libvirt-python, QEMU for real guests, the peer exporter the benchmark measures against.
DEBS := python3-venv python3-dev gcc pkg-config libvirt-dev openssl \
        prometheus prometheus-alertmanager victoria-metrics prometheus-libvirt-exporter \
        qemu-system-x86 qemu-utils busybox-static cpio docker-compose \
        libvirt-daemon libvirt-daemon-driver-qemu prometheus-node-exporter

.PHONY: all debs venv test test-fast upgrade-check demo lab bench lint clean

all: test

debs:
	@scripts/ensure-debs $(DEBS)

$(UV): requirements/uv.txt
	@test -x $(TOOLS)/bin/pip || $(PYTHON) -m venv $(TOOLS)
	@$(TOOLS)/bin/pip install -q --disable-pip-version-check --require-hashes -r requirements/uv.txt
	@touch $(UV)

# `--locked` refuses to install when uv.lock no longer matches pyproject.toml.
$(STAMP): pyproject.toml uv.lock $(UV) | debs
	@$(SYNC)
	@touch $(STAMP)

venv: debs $(STAMP)

# The project's own bytecode, written even where PYTHONDONTWRITEBYTECODE is set (the venv's is
# written at install, `--compile-bytecode`): the suite starts the CLI hundreds of times.
BYTECODE := $(PY) -m compileall -q exporter recommender devkit lab

# Style, types and layering first, then every test (CI runs exactly this).
test: lint venv
	@$(BYTECODE)
	$(PY) -m pytest -q -p no:cacheprovider

# The inner loop: everything but the tests that start real servers or guests.
test-fast: venv
	@$(BYTECODE)
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow"

# The newest versions pyproject.toml allows, in a scratch venv, against the fast tests: run it
# before bumping uv.lock (`$(UV) lock --upgrade`, then `make test`). uv.lock is not touched.
UPGRADE_VENV := $(TOOLS)/upgrade-check
upgrade-check: debs $(UV)
	@rm -rf $(UPGRADE_VENV)
	@$(UV) venv --quiet --python $(PYTHON) $(UPGRADE_VENV)
	@VIRTUAL_ENV=$(UPGRADE_VENV) $(UV) pip install --quiet --upgrade -e '.[libvirt,recommender]' --group dev
	@echo "versions that differ from uv.lock:"
	@$(UV) lock --upgrade --dry-run 2>&1 | grep -E '^Update|^Add|^Remove' || echo "  none"
	$(UPGRADE_VENV)/bin/python -m pytest -q -p no:cacheprovider -m "not slow"

demo: venv
	$(PY) demo/run.py

# The real-hypervisor lab: a private libvirtd and Proxmox-like QEMU nodes with guests doing
# real disk I/O, exporters, Prometheus, a live migration (about 4 minutes).
lab: venv
	$(PY) -m lab.run

bench: venv
	@set -e; for script in bench/bench_*.py; do echo "== $$script"; $(PY) $$script; done

# Lint needs no Debian package: its own venv from the lock, without libvirt-python (which
# compiles against libvirt-dev). ruff (style and complexity), mypy --strict on the product
# packages, and the layering contracts of docs/architecture.md (import-linter).
LINT_VENV := $(TOOLS)/lint
LINT_STAMP := $(LINT_VENV)/.installed
$(LINT_STAMP): pyproject.toml uv.lock $(UV)
	@UV_PROJECT_ENVIRONMENT=$(LINT_VENV) $(UV) sync --locked --quiet --python $(PYTHON) --extra recommender
	@touch $(LINT_STAMP)

lint: $(LINT_STAMP)
	$(LINT_VENV)/bin/ruff check .
	$(LINT_VENV)/bin/ruff format --check .
	$(LINT_VENV)/bin/mypy
	$(LINT_VENV)/bin/lint-imports --no-cache

clean:
	rm -rf $(VENV) $(TOOLS) build *.egg-info .pytest_cache
