# The README's two commands:
#   make demo   set up the package alone (no dev or Ray extras), build an atlas with configs/cpu.toml, print how to view it
#   make test   set up what the tests need (the dev and Ray extras at the versions of constraints/ci.txt, Chromium,
#               ffmpeg), print the machine and torch it runs on, then lint and run the whole suite (what .ci/run calls)
# Every set-up step is idempotent and quick once done: a stamp file (or a check of the result)
# stands for it and is redone only when its inputs change (pyproject.toml, constraints/ci.txt).
# System packages (python3.X-venv, chromium, ffmpeg) are installed with apt-get only when missing, running as
# root, and apt-get exists; otherwise one line says what to install (without apt on macOS and elsewhere).

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
.PHONY: help demo test setup setup-demo serve lint pytest env-report system-python system-chromium system-ffmpeg

PYTHON ?= python3
VENV ?= .venv
STAMPS := $(VENV)/.atlas-stamps
CONSTRAINTS := constraints/ci.txt
PIP_INSTALL := $(VENV)/bin/python -m pip install --disable-pip-version-check
CONFIG ?= configs/cpu.toml
OUT ?= outputs/cpu
SHARED := ../shared
IMAGES ?= $(wildcard $(SHARED)/data/imagenet-samples)
# the demo's weights: $(WEIGHTS), else $ATLAS_WEIGHTS, else the shared BVLC file when present, else atlas's own
# lookup (the user cache, then a checked download)
WEIGHTS ?= $(if $(ATLAS_WEIGHTS),,$(wildcard $(SHARED)/models/bvlc_googlenet.safetensors))
# the browser of the viewer tests and ffmpeg of the live page's camera test: found on PATH (Debian, Homebrew), or
# in macOS's Applications folder, else the Debian path that apt-get installs to
ifeq ($(origin CHROMIUM),undefined)
CHROMIUM := $(or $(firstword $(shell command -v chromium chromium-browser 2>/dev/null) \
                             $(wildcard /Applications/Chromium.app/Contents/MacOS/Chromium)),/usr/bin/chromium)
endif
ifeq ($(origin FFMPEG),undefined)
FFMPEG := $(or $(shell command -v ffmpeg 2>/dev/null),/usr/bin/ffmpeg)
endif

# apt-get install $(1) when running as root where apt-get exists; else stop with one line ($(2): what is missing) saying
# what to install: the apt-get command where there is apt-get, else $(3), which names no package manager (macOS, ...)
apt_install = if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "== apt-get install $(1)"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(1) >/dev/null; \
	elif command -v apt-get >/dev/null; then echo "atlas: $(2): install it with  sudo apt-get install $(1)  and run make again" >&2; exit 2; \
	else echo "atlas: $(2): install $(3) and run make again" >&2; exit 2; fi
# the same advice inside a warning
install_hint = $$(command -v apt-get >/dev/null && echo "sudo apt-get install $(1)" || echo "install $(2)")

# checked when make reads this file, so a demo without images stops at once, in one line, before any set-up
ifneq ($(filter demo,$(MAKECMDGOALS)),)
ifeq ($(strip $(IMAGES)),)
$(error atlas: no images: $(SHARED)/data/imagenet-samples is absent; run  make demo IMAGES=DIR  (a folder of images or a list file))
endif
endif

help:
	@echo "make demo   set up the package, build an atlas of ../shared/data/imagenet-samples (or IMAGES=DIR) with $(CONFIG), print the viewer URL"
	@echo "make test   set up (venv, dev and ray extras with $(CONSTRAINTS), chromium, ffmpeg), then ruff and the whole test suite"

# ---------------------------------------------------------------------------- the two commands
demo: setup-demo
	$(VENV)/bin/atlas build --config $(CONFIG) --images "$(IMAGES)" --out $(OUT) $(if $(WEIGHTS),--weights $(WEIGHTS))
	@echo "atlas viewer: run  $(VENV)/bin/atlas serve $(OUT)  and open http://127.0.0.1:8000/tiles/index.html"

test: setup system-chromium system-ffmpeg env-report lint pytest

# ---------------------------------------------------------------------------- steps
# what the demo needs: the package and its runtime dependencies
setup-demo: $(STAMPS)/package
# what the tests need: the package with the dev and ray extras, at the versions CI tests
setup: $(STAMPS)/test

serve:
	$(VENV)/bin/atlas serve $(OUT)

lint: setup
	$(VENV)/bin/ruff check .

pytest: setup
	ATLAS_CHROMIUM=$(CHROMIUM) ATLAS_FFMPEG=$(FFMPEG) $(VENV)/bin/python -m pytest -q --durations=30

# one line on what the suite runs on, so its timings can be read: CPU model, native bfloat16 (avx512_bf16, amx_bf16
# on x86; FEAT_BF16 on Apple silicon), torch's version, CPU kernels and thread count
define ENV_REPORT
import os, platform, subprocess, sys
import torch
cpu = platform.processor() or platform.machine()
if os.path.exists("/proc/cpuinfo"):
    info = {}
    for line in open("/proc/cpuinfo"):
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())  # the first processor's lines
    cpu, flags = info.get("model name", cpu), set(info.get("flags", info.get("Features", "")).split())
    bf16 = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in ("avx512_bf16", "amx_bf16"))
elif sys.platform == "darwin":
    def sysctl(name):
        return subprocess.run(["sysctl", "-n", name], capture_output=True, text=True).stdout.strip()
    cpu = sysctl("machdep.cpu.brand_string") or cpu
    bf16 = f"FEAT_BF16 {'yes' if sysctl('hw.optional.arm.FEAT_BF16') == '1' else 'no'}"
else:
    bf16 = "unknown"
print(f"== environment: {cpu}, {os.cpu_count()} CPUs; native bfloat16: {bf16}; torch {torch.__version__} "
      f"({torch.backends.cpu.get_cpu_capability()} kernels, {torch.get_num_threads()} threads); Python {platform.python_version()}")
endef
export ENV_REPORT

env-report: setup
	@$(VENV)/bin/python -c "$$ENV_REPORT"

system-python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
	  echo "atlas: needs Python 3.11 or newer; $(PYTHON) is $$($(PYTHON) --version 2>&1 || echo missing): run make PYTHON=python3.11 ..." >&2; exit 2; }

# the viewer tests need Chromium: installed when root with apt-get; otherwise they are skipped (and fail under CI=true)
# after one line saying what to install
system-chromium:
	@[ -x "$(CHROMIUM)" ] || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null || { $(call apt_install,chromium,$(CHROMIUM) not found,chromium (or set CHROMIUM=/path/to/chromium)); }
	@[ -x "$(CHROMIUM)" ] || echo "atlas: warning: $(CHROMIUM) not found: the browser tests will be skipped ($(call install_hint,chromium,chromium or set CHROMIUM=/path/to/chromium))" >&2

# the live page's browser test makes its fake camera's video with ffmpeg: installed when root with apt-get; otherwise
# skipped (failed under CI=true)
system-ffmpeg:
	@[ -x "$(FFMPEG)" ] || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null || { $(call apt_install,ffmpeg,$(FFMPEG) not found,ffmpeg (or set FFMPEG=/path/to/ffmpeg)); }
	@[ -x "$(FFMPEG)" ] || echo "atlas: warning: $(FFMPEG) not found: the live page's camera test will be skipped ($(call install_hint,ffmpeg,ffmpeg or set FFMPEG=/path/to/ffmpeg))" >&2

# a venv needs ensurepip, which Debian/Ubuntu ship apart (python3.X-venv)
$(VENV)/bin/python:
	@$(MAKE) --no-print-directory system-python
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { rm -rf $(VENV); \
	  pkg=$$($(PYTHON) -c 'import sys; print("python%d.%d-venv" % sys.version_info[:2])'); \
	  $(call apt_install,$$pkg,$(PYTHON) cannot create a venv (no ensurepip),a Python 3.11+ that has the venv module and ensurepip); \
	  $(PYTHON) -m venv $(VENV); }
	@echo "== $(VENV) created with $$($(VENV)/bin/python --version)"

# the package alone (an editable install of this checkout): redone when pyproject.toml changes
$(STAMPS)/package: pyproject.toml | $(VENV)/bin/python
	$(PIP_INSTALL) -q --upgrade pip
	$(PIP_INSTALL) -q -e .
	@mkdir -p $(STAMPS) && touch $@

# the package with the dev and ray extras, at the tested versions: redone when pyproject.toml or the constraints change
$(STAMPS)/test: pyproject.toml $(CONSTRAINTS) | $(VENV)/bin/python
	$(PIP_INSTALL) -q --upgrade pip
	$(PIP_INSTALL) -q -e '.[dev,ray]' -c $(CONSTRAINTS)
	@mkdir -p $(STAMPS) && touch $@
