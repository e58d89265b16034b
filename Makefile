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

.PHONY: demo test test-styles test-latest lock bench bench-gpu install samples embedded embedded-sdxl clean

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

# The main jobs on the embedded base: a labelled grid of pictures for several prompts; then two style
# adapters (dots, neon) trained on samples/styles/NAME with `sdlora train`'s default settings (--quant auto: float here),
# each exported for kohya/A1111/ComfyUI into out/demo-library/ and shown before/after (per prompt, a row
# without, a row with it); then the mix: the web page's X/Y grid of the two weights 0, 0.5, 1. The two styles
# train side by side, one process of one thread each: this small UNet's steps are too short to keep two threads
# busy (150 steps of dots: 30 s on two threads; dots and neon together on one thread each: 34 s).
DEMO_STYLES := dots neon
demo: $(VENV)/.installed
	$(VENV)/bin/sdlora generate "a red circle" "a blue square" "a green triangle" "a yellow diamond" \
		"a purple circle" "a yellow circle on a black background" \
		--num 6 --seed 0 --steps 25 --out out/demo-grid.png --quiet
	@echo "demo: wrote out/demo-grid.png"
	rm -rf out/demo-style out/demo-library
	mkdir -p out/demo-library
	pids=""; for style in $(DEMO_STYLES); do \
		( export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 && \
		$(VENV)/bin/sdlora train samples/styles/$$style --out out/demo-style/$$style --name $$style --quiet && \
		$(VENV)/bin/sdlora export out/demo-style/$$style/$$style.safetensors --format kohya \
			--out out/demo-library/$$style.safetensors && \
		$(VENV)/bin/sdlora generate "a red circle, z$$style" "a blue square, z$$style" "a green triangle, z$$style" \
			--adapter out/demo-library/$$style.safetensors --compare --num 6 --seed 0 --steps 25 \
			--out out/demo-$$style.png --quiet > /dev/null && \
		echo "demo: wrote out/demo-style/$$style/$$style.safetensors, its kohya copy out/demo-library/$$style.safetensors and out/demo-$$style.png" ) & \
		pids="$$pids $$!"; \
	done; \
	failed=0; for pid in $$pids; do wait $$pid || failed=1; done; exit $$failed
	$(VENV)/bin/sdlora xy "a blue square, zdots, zneon" "a green triangle, zdots, zneon" --library out/demo-library \
		--x dots=0,0.5,1 --y neon=0,0.5,1 --seed 0 --steps 25 --out out/demo-mix.png > /dev/null
	@echo "demo: wrote out/demo-mix.png (dots weight across, neon weight down)"

# Two workers for two cores (tests/conftest.py gives each one thread).
TEST_WORKERS ?= 2
test: $(VENV)/.installed-test
	$(PY) -m pytest -q -rs --durations=12 -n $(TEST_WORKERS) tests

# The per-style learning tests for all four sample styles (make test runs dots and neon: ~4 minutes more each).
test-styles: $(VENV)/.installed-test
	SDLORA_ALL_STYLES=1 $(PY) -m pytest -q -rs -n $(TEST_WORKERS) tests/test_training_style_v2.py

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
# The CUDA bench (tests/bench/gpu.py): ours against diffusers + PEFT on one GPU, bf16 and NF4, MFU; refuses without
# CUDA. About 8 minutes on an H100/H200.
bench-gpu: $(VENV)/.installed-test
	$(PY) -m tests.bench.gpu --out bench-gpu.json

# a table on stdout and bench-results.json. Not part of make test: timings belong here.
bench: $(VENV)/.installed-test
	$(PY) -m tests.bench.run --out bench-results.json

# Rebuild samples/ (seeded). `embedded` runs the v2 build of issue 13 (texture VAE about 19 minutes, then the
# UNet and text encoder); samples/embedded still ships the v1 base until v2 passes its tests.
embedded: $(VENV)/.installed
	$(PY) train_scripts/build_embedded_base.py --out samples/embedded

# The SDXL-family sibling (issue 15): the embedded VAE, two text encoders and a UNet with SDXL's added
# conditioning, 1,600 steps (about 40 minutes on idle cores).
embedded-sdxl: $(VENV)/.installed
	$(PY) train_scripts/build_embedded_base.py --family sdxl --vae-from samples/embedded/vae \
		--unet-steps 1600 --save-every 400 --out samples/embedded-sdxl

samples: $(VENV)/.installed
	$(PY) train_scripts/make_samples.py --out samples/styles

clean:
	rm -rf out .pytest_cache
