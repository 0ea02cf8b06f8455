# vmbalance — every target installs what it needs first (Debian 12, root or sudo).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Debian packages: python build basics, the real servers the tests run, libvirt headers for
# libvirt-python, QEMU for real guests, the peer exporter the benchmark measures against.
DEBS := python3-venv python3-dev gcc pkg-config libvirt-dev openssl \
        prometheus prometheus-alertmanager victoria-metrics prometheus-libvirt-exporter \
        qemu-system-x86 qemu-utils busybox-static cpio docker-compose \
        libvirt-daemon libvirt-daemon-driver-qemu

.PHONY: all debs venv test demo lab bench lint clean

all: test

debs:
	@scripts/ensure-debs $(DEBS)

$(STAMP): pyproject.toml | debs
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -m pip install -q -e '.[libvirt,dev]'
	@touch $(STAMP)

venv: debs $(STAMP)

test: venv
	$(PY) -m pytest -q -p no:cacheprovider

demo: venv
	$(PY) demo/run.py

# The real-hypervisor lab: a private libvirtd and Proxmox-like QEMU nodes with guests doing
# real disk I/O, exporters, Prometheus, a live migration (about 4 minutes).
lab: venv
	$(PY) -m lab.run

bench: venv
	@set -e; for script in bench/bench_*.py; do echo "== $$script"; $(PY) $$script; done

lint: venv
	$(VENV)/bin/ruff check exporter recommender tests bench lab demo
	$(VENV)/bin/ruff format --check exporter recommender tests bench lab demo

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
