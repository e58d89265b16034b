# sdlora: `make demo` and `make test` work on a fresh clone; both create .venv when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch is installed first and pinned: an unpinned torch would pull several GB of CUDA packages.
TORCH ?= torch==2.13.0
export GRADIO_ANALYTICS_ENABLED = False
export HF_HUB_DISABLE_TELEMETRY = 1
# The tested versions (pip constraints form; see requirements/lock.py). Installs into $(VENV) take exactly
# these, and so does pip's isolated build of sdlora itself (the build backend, setuptools): pip 25.3 and
# later take build constraints only from --build-constraint / PIP_BUILD_CONSTRAINT, older pips from
# PIP_CONSTRAINT; environment variables reach both the first (old) pip and the upgraded one.
LOCK := requirements/lock.txt
LOCKED := PIP_CONSTRAINT=$(CURDIR)/$(LOCK) PIP_BUILD_CONSTRAINT=$(CURDIR)/$(LOCK)
# Unlocked installs must not inherit a constraint from the caller's environment.
UNLOCKED := env -u PIP_CONSTRAINT -u PIP_BUILD_CONSTRAINT

.PHONY: demo test test-latest lock bench install samples embedded clean

$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(LOCKED) $(PIP) install -q --upgrade pip setuptools
	$(LOCKED) $(PIP) install -q $(TORCH)
	$(LOCKED) $(PIP) install -q -e .
	$(PY) requirements/lock.py check
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(LOCKED) $(PIP) install -q -e ".[test]"
	$(PY) requirements/lock.py check
	touch $@

install: $(VENV)/.installed

# The main jobs on the embedded base: a labelled grid of pictures for several prompts; then a mosaic
# style adapter trained on samples/styles/mosaic (NF4 base, 300 steps), exported for kohya/A1111/ComfyUI,
# and the before/after grid of that export on the float base (per prompt, a row without, a row with it).
demo: $(VENV)/.installed
	$(VENV)/bin/sdlora generate "a red circle" "a blue square" "a green triangle" "a yellow diamond" \
		"a purple circle" "a yellow circle on a black background" \
		--num 6 --seed 0 --steps 25 --out out/demo-grid.png --quiet
	@echo "demo: wrote out/demo-grid.png"
	rm -rf out/demo-style
	$(VENV)/bin/sdlora train samples/styles/mosaic --out out/demo-style --name mosaic --rank 8 --lr 1e-3 \
		--steps 300 --quiet
	$(VENV)/bin/sdlora export out/demo-style/mosaic.safetensors --format kohya --out out/demo-style/mosaic-kohya.safetensors
	$(VENV)/bin/sdlora generate "a red circle, zmosaic" "a blue square, zmosaic" "a green triangle, zmosaic" \
		--adapter out/demo-style/mosaic-kohya.safetensors --compare --num 6 --seed 0 --steps 25 \
		--out out/demo-before-after.png --quiet > /dev/null
	@echo "demo: wrote out/demo-style/mosaic.safetensors (kohya copy beside it) and out/demo-before-after.png"

test: $(VENV)/.installed-test
	$(PY) -m pytest -q -rs tests

# Drift found on purpose, not by a red CI: a fresh .venv-latest with the newest versions the registries
# serve (no lock), the differences from the lock, then the whole suite there. May fail; not part of CI.
test-latest:
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	$(UNLOCKED) .venv-latest/bin/python -m pip install -q --upgrade pip setuptools
	$(UNLOCKED) .venv-latest/bin/python -m pip install -q $(TORCH)
	$(UNLOCKED) .venv-latest/bin/python -m pip install -q -e ".[test]"
	.venv-latest/bin/python requirements/lock.py drift
	SDLORA_UNLOCKED=1 .venv-latest/bin/python -m pytest -q -rs tests

# Rewrite the lock from the newest versions the registries serve, less what requirements/hold.txt holds back
# (run make test-latest first, make test after).
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	$(UNLOCKED) .venv-lock/bin/python -m pip install -q --upgrade pip setuptools
	$(UNLOCKED) .venv-lock/bin/python -m pip install -q $(TORCH)
	$(UNLOCKED) .venv-lock/bin/python -m pip install -q -e ".[test]" -c requirements/hold.txt
	.venv-lock/bin/python -m pip freeze --all --exclude-editable > .venv-lock/freeze.txt
	$(PYTHON) requirements/lock.py write .venv-lock/freeze.txt
	rm -rf .venv-lock

# Speed and memory against diffusers + PEFT, measured side by side (about 20 minutes on two cores):
# a table on stdout and bench-results.json. Not part of make test: timings belong here.
bench: $(VENV)/.installed-test
	$(PY) -m tests.bench.run --out bench-results.json

# Rebuild samples/ (seeded). `embedded` runs the v2 build of issue 13 (texture VAE about 19 minutes, then the
# UNet and text encoder); samples/embedded still ships the v1 base until v2 passes its tests.
embedded: $(VENV)/.installed
	$(PY) train_scripts/build_embedded_base.py --out samples/embedded

samples: $(VENV)/.installed
	$(PY) train_scripts/make_samples.py --out samples/styles

clean:
	rm -rf out .pytest_cache
