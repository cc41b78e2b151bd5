# edge-sdk developer entry points.
#
# On a fresh Debian/Ubuntu with python3 (>= 3.10) and root:
#     make demo     # virtualenv + host tools, then `edgectl demo`
#     make test     # + test extras, mosquitto, chromium and promtool binaries, then pytest
#
# Recipes are POSIX sh. Stamp files inside the virtualenv keep re-runs fast;
# they depend on pyproject.toml, so changing dependencies reinstalls.

PYTHON      ?= python3
VENV        ?= .venv
DEMO_ARGS   ?=
PYTEST_ARGS ?=

VENV_PY     := $(VENV)/bin/python
PIP         := $(VENV_PY) -m pip
STAMP_VENV  := $(VENV)/.stamp-venv
STAMP_HOST  := $(VENV)/.stamp-host
STAMP_TEST  := $(VENV)/.stamp-test

# Root runs apt-get itself; anyone else goes through sudo.
SUDO        := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Another apt-get (an unattended upgrade, a second checkout) may hold the dpkg lock: wait for it.
APT_GET     := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get -y -q -o DPkg::Lock::Timeout=900

.DEFAULT_GOAL := help
.PHONY: help venv test-deps test-packages demo lint test test-arm64 test-armhf clean

help:
	@echo "make demo    create .venv, install edge-sdk[host,litert], run 'edgectl demo \$$DEMO_ARGS'"
	@echo "make test    also install test extras, mosquitto, chromium and promtool, run 'make lint', then 'pytest \$$PYTEST_ARGS'"
	@echo "make test-arm64  the agent in an emulated Debian bookworm arm64 userland (root; see tests/userland.py)"
	@echo "make test-armhf  the same in Debian bookworm and trixie armhf (32-bit Raspberry Pi OS)"
	@echo "make lint    ruff check, ruff format --check and mypy (the house checks; part of 'make test')"
	@echo "make venv    only create .venv with edge-sdk[host,litert]"
	@echo "make clean   remove .venv and build outputs"

# --- virtualenv ---------------------------------------------------------------------

# Debian and Ubuntu ship python3 without venv/ensurepip; install python3-venv when
# `python3 -m venv` fails for that reason. An existing, working venv is kept.
$(STAMP_VENV):
	@set -e; \
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { \
	    echo "edge-sdk needs Python >= 3.10; '$(PYTHON)' is $$($(PYTHON) -V 2>&1)" >&2; exit 1; }; \
	if [ -x "$(VENV_PY)" ] && "$(VENV_PY)" -m pip --version >/dev/null 2>&1; then \
	    echo "using existing virtualenv $(VENV)"; \
	elif ! $(PYTHON) -m venv "$(VENV)"; then \
	    echo "'$(PYTHON) -m venv' failed; installing python3-venv with apt-get" >&2; \
	    rm -rf "$(VENV)"; \
	    command -v apt-get >/dev/null 2>&1 || { \
	        echo "no apt-get here: install the venv module for $(PYTHON) and retry" >&2; exit 1; }; \
	    $(APT_GET) update; \
	    $(APT_GET) install --no-install-recommends python3-venv; \
	    $(PYTHON) -m venv "$(VENV)"; \
	fi; \
	$(PIP) install --upgrade pip; \
	touch "$@"

$(STAMP_HOST): $(STAMP_VENV) pyproject.toml
	$(PIP) install -e '.[host,litert]'
	touch "$@"

# The test extras include the host ones, so this stamp also satisfies `venv`.
# torch (the `train` extra: fine-tuning, distillation) is pinned and installed first,
# so that the extra's `torch>=2.1` is already satisfied and pip never picks a newer
# (CUDA, multi-GB) build on its own. `make demo` does not install torch.
TORCH_VERSION ?= 2.13.0
$(STAMP_TEST): $(STAMP_VENV) pyproject.toml
	$(PIP) install 'torch==$(TORCH_VERSION)'
	$(PIP) install -e '.[host,litert,test,postgres,train,bench]'
	touch "$(STAMP_HOST)" "$@"

venv: $(STAMP_HOST)

test-deps: $(STAMP_TEST) test-packages

# --- Debian packages the tests use (binaries only) ---------------------------------------

# mosquitto: the tests start their own brokers on free loopback ports.
# chromium: the HTML report is opened in headless Chromium (networking off).
# prometheus: its promtool checks the exporter's scrape (`promtool check metrics`).
# A package is installed only when its binary is missing, all missing ones in one
# apt-get run, so a second `make test` is a no-op here. The machine-wide services these
# packages bring (mosquitto, prometheus) must not be started: policy-rc.d (exit 101)
# stops Debian maintainer scripts from starting them; if one is already present it is
# left alone, and a service a package started anyway is stopped.
#   package:binary pairs; the binary is looked up on PATH and in /usr/sbin.
TEST_PACKAGES := mosquitto:mosquitto chromium:chromium prometheus:promtool

test-packages:
	@set -e; \
	present() { command -v "$$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$$1" ]; }; \
	missing=; \
	for pair in $(TEST_PACKAGES); do \
	    present "$${pair#*:}" || missing="$$missing $${pair%%:*}"; \
	done; \
	[ -n "$$missing" ] || exit 0; \
	command -v apt-get >/dev/null 2>&1 || { \
	    echo "missing:$$missing, and there is no apt-get: install these Debian packages" >&2; exit 1; }; \
	echo "installing$$missing (binaries only; no service is started)"; \
	policy=/usr/sbin/policy-rc.d; made_policy=; \
	if [ ! -e "$$policy" ]; then \
	    printf '#!/bin/sh\nexit 101\n' | $(SUDO) tee "$$policy" >/dev/null; \
	    $(SUDO) chmod 755 "$$policy"; made_policy=1; \
	fi; \
	status=0; \
	{ $(APT_GET) update && $(APT_GET) install --no-install-recommends $$missing; } || status=$$?; \
	if [ -n "$$made_policy" ]; then $(SUDO) rm -f "$$policy"; fi; \
	[ "$$status" -eq 0 ] || exit "$$status"; \
	for service in $$missing; do \
	    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$$service" 2>/dev/null; then \
	        echo "stopping the $$service service the package started" >&2; \
	        $(SUDO) systemctl stop "$$service" || true; \
	    fi; \
	done; \
	for pair in $(TEST_PACKAGES); do \
	    present "$${pair#*:}" || { echo "$${pair%%:*} installed but $${pair#*:} is not found" >&2; exit 1; }; \
	done

# --- entry points -------------------------------------------------------------------

demo: $(STAMP_HOST)
	$(VENV)/bin/edgectl demo $(DEMO_ARGS)

# The house checks: lint rules and formatting (ruff), types (mypy: strict for edge_sdk
# and device_agent, default for host_tools; see pyproject.toml). All three always run,
# so one report shows every finding; the target fails if any of them did.
lint: $(STAMP_TEST)
	@status=0; \
	echo "ruff check"; $(VENV)/bin/ruff check . || status=1; \
	echo "ruff format --check"; $(VENV)/bin/ruff format --check . || status=1; \
	echo "mypy"; $(VENV)/bin/mypy || status=1; \
	exit $$status

# The suite runs on TEST_JOBS pytest-xdist workers, one test file per worker at a time
# (module fixtures such as the demo's two runs are made once). Most integration tests wait
# on real processes, so more workers than cores still shortens the run; TEST_JOBS=0 runs
# everything in this one process.
TEST_JOBS ?= 3
test: test-deps lint
	$(VENV_PY) -m pytest -n $(TEST_JOBS) --dist loadfile --durations=25 $(PYTEST_ARGS)

# --- emulated ARM userlands (root: mmdebstrap, binfmt_misc, mounts, chroot) -----------

# deploy/arm/userland.sh builds a Debian userland once (qemu-user, mmdebstrap) and keeps it
# as a checksummed tarball under ~/.cache/edge-sdk (measured on 2 cores shared with other
# work, load average 170-500: arm64 19.5 min wall, 3.9 min CPU; bookworm armhf 52 min wall,
# 4.1 min CPU; trixie armhf about 6 min at nice 19 beside a test run; arm64 again on a fresh
# machine, 11 min beside benchmarks, load 3-90; from the cached
# tarballs, pip install included: the arm64 tests 140 s, the armhf ones 148 s);
# the tests unpack it, install edge-sdk from this tree with pip as the README says, run
# the agent there under qemu and edgectl here, and unmount everything when they end.
USERLAND := sh deploy/arm/userland.sh

test-arm64: test-deps
	@set -e; tarball=$$($(USERLAND) arm64 bookworm); \
	EDGE_SDK_USERLAND_BOOKWORM_ARM64="$$tarball" \
	    $(VENV_PY) -m pytest tests/integration/arm/test_arm64_userland.py $(PYTEST_ARGS)

test-armhf: test-deps
	@set -e; bookworm=$$($(USERLAND) armhf bookworm); trixie=$$($(USERLAND) armhf trixie); \
	EDGE_SDK_USERLAND_BOOKWORM_ARMHF="$$bookworm" EDGE_SDK_USERLAND_TRIXIE_ARMHF="$$trixie" \
	    $(VENV_PY) -m pytest tests/integration/arm/test_armhf_userland.py $(PYTEST_ARGS)

clean:
	rm -rf "$(VENV)" build dist .pytest_cache .hypothesis demo-out
	rm -rf ./*.egg-info
	find . -path "./$(VENV)" -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
