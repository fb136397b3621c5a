# The README's two commands:
#   make demo   set everything up, build an atlas with configs/cpu.toml, print how to view it
#   make test   set up what the tests need, then lint and run the whole suite (what .ci/run calls)
# Every set-up step is idempotent and quick once done: a stamp file (or a check of the result)
# stands for it and is redone only when its inputs change (pyproject.toml, package-lock.json).
# System packages (python3-venv, npm, chromium) are installed with apt-get only when missing
# and running as root; otherwise one line says what to install.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
.PHONY: help demo test setup serve lint pytest system-python system-npm system-chromium system-ffmpeg

PYTHON ?= python3
VENV := .venv
STAMPS := $(VENV)/.atlas-stamps
CONFIG ?= configs/cpu.toml
OUT ?= outputs/cpu
SHARED := ../shared
IMAGES ?= $(wildcard $(SHARED)/data/imagenet-samples)
# the demo's weights: $(WEIGHTS), else $ATLAS_WEIGHTS, else the shared BVLC file when present, else atlas's own
# lookup (the user cache, then a checked download)
WEIGHTS ?= $(if $(ATLAS_WEIGHTS),,$(wildcard $(SHARED)/models/bvlc_googlenet.safetensors))
CHROMIUM ?= /usr/bin/chromium
FFMPEG ?= /usr/bin/ffmpeg

# apt-get install $(1) when running as root, else stop with one line saying what to install ($(2): what is missing)
apt_install = if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "== apt-get install $(1)"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(1) >/dev/null; \
	else echo "atlas: $(2): install it with  sudo apt-get install $(1)  and run make again" >&2; exit 2; fi

# checked when make reads this file, so a demo without images stops at once, in one line, before any set-up
ifneq ($(filter demo,$(MAKECMDGOALS)),)
ifeq ($(strip $(IMAGES)),)
$(error atlas: no images: $(SHARED)/data/imagenet-samples is absent; run  make demo IMAGES=DIR  (a folder of images or a list file))
endif
endif

help:
	@echo "make demo   set up, build an atlas of ../shared/data/imagenet-samples (or IMAGES=DIR) with $(CONFIG), print the viewer URL"
	@echo "make test   set up (venv, dev extra, npm ci, chromium), then ruff and the whole test suite"

# ---------------------------------------------------------------------------- the two commands
demo: setup
	$(VENV)/bin/atlas build --config $(CONFIG) --images "$(IMAGES)" --out $(OUT) $(if $(WEIGHTS),--weights $(WEIGHTS))
	@echo "atlas viewer: run  $(VENV)/bin/atlas serve $(OUT)  and open http://127.0.0.1:8000/tiles/index.html"

test: setup system-chromium system-ffmpeg lint pytest

# ---------------------------------------------------------------------------- steps
setup: $(STAMPS)/python node_modules/.package-lock.json

serve:
	$(VENV)/bin/atlas serve $(OUT)

lint: setup
	$(VENV)/bin/ruff check .

pytest: setup
	ATLAS_CHROMIUM=$(CHROMIUM) ATLAS_FFMPEG=$(FFMPEG) $(VENV)/bin/python -m pytest -q --durations=30

system-python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
	  echo "atlas: needs Python 3.11 or newer; $(PYTHON) is $$($(PYTHON) --version 2>&1 || echo missing): run make PYTHON=python3.11 ..." >&2; exit 2; }

system-npm:
	@command -v npm >/dev/null || { $(call apt_install,npm,npm not found (OpenSeadragon for the viewer comes from npm)); }

# the viewer tests need Chromium: installed when root; otherwise they are skipped (and fail under CI=true)
system-chromium:
	@[ -x "$(CHROMIUM)" ] || [ "$$(id -u)" != 0 ] || { $(call apt_install,chromium,$(CHROMIUM) not found); }
	@[ -x "$(CHROMIUM)" ] || echo "atlas: warning: $(CHROMIUM) not found: the browser tests will be skipped (sudo apt-get install chromium)" >&2

# the live page's browser test makes its fake camera's video with ffmpeg: installed when root; otherwise skipped (failed under CI=true)
system-ffmpeg:
	@[ -x "$(FFMPEG)" ] || [ "$$(id -u)" != 0 ] || { $(call apt_install,ffmpeg,$(FFMPEG) not found); }
	@[ -x "$(FFMPEG)" ] || echo "atlas: warning: $(FFMPEG) not found: the live page's camera test will be skipped (sudo apt-get install ffmpeg)" >&2

# a venv needs ensurepip, which Debian/Ubuntu ship apart (python3.X-venv)
$(VENV)/bin/python:
	@$(MAKE) --no-print-directory system-python
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { rm -rf $(VENV); \
	  pkg=$$($(PYTHON) -c 'import sys; print("python%d.%d-venv" % sys.version_info[:2])'); \
	  $(call apt_install,$$pkg,$(PYTHON) cannot create a venv (no ensurepip)); $(PYTHON) -m venv $(VENV); }
	@echo "== $(VENV) created with $$($(VENV)/bin/python --version)"

# the environment: redone when pyproject.toml or setup.py change
$(STAMPS)/python: pyproject.toml setup.py | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check -e '.[dev,ray]'
	@mkdir -p $(STAMPS) && touch $@

# OpenSeadragon at the version of package-lock.json (npm ci writes node_modules/.package-lock.json)
node_modules/.package-lock.json: package-lock.json
	@$(MAKE) --no-print-directory system-npm
	npm ci --no-audit --no-fund --loglevel=error
	@touch $@
