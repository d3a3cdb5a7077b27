# dalle2-rt: the two commands of the quickstart are `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SETUP_SUM := $(shell cat setup.py | cksum | cut -d' ' -f1)
STAMP := $(VENV)/.installed-$(SETUP_SUM)
RUNTIME_STAMP := $(VENV)/.runtime-$(SETUP_SUM)
ENGINES := engines/shapes-v2
CHECKPOINTS := checkpoints/shapes-v2
# the package's copy of $(ENGINES), which the wheel carries (export/package.py; rebuilt by make package-engines)
PACKAGED := dalle2_rt/engines/$(notdir $(ENGINES))
PROMPT ?= a large red circle on the left, black background

.PHONY: setup runtime engines engines-guided engines-fast engines-steps engines-compact engines-sr1 engines-sr1-int8 engines-compact-sr1 \
	engines-compact-sr1-int8 package-engines wheel-check \
	demo test lint bench train train-gpu clean test-browser test-ray test-dalle2-pytorch

setup: $(STAMP)

$(STAMP): setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[train,dev,diffusers,serve]'
	@touch $@ $(RUNTIME_STAMP)

# The runtime alone (numpy, onnxruntime, pillow; no torch): all that make demo needs.
runtime: $(RUNTIME_STAMP)

$(RUNTIME_STAMP): setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e .
	@touch $@

engines: $(ENGINES)/manifest.json

$(ENGINES)/manifest.json: $(STAMP) $(wildcard $(CHECKPOINTS)/*/model/* $(CHECKPOINTS)/defaults.json)
	@test -f $(CHECKPOINTS)/decoder/model/model.safetensors || \
		{ echo "the bundled model is not trained yet: $(CHECKPOINTS) has no decoder (see README, Training)"; exit 1; }
	$(PY) -m export.all --checkpoints $(CHECKPOINTS) --out $(ENGINES)

# A variant of the bundled model exported to engines/shapes-v2-$(1): the bundled checkpoints with the decoder/ and
# sr/ of checkpoints/shapes-v2-V laid over them, for each V of $(2) in order (default: $(1) alone), and the last
# V's defaults.json, whole (so a combination's last variant states every stage's defaults: shapes-v2-sr1's are the
# bundled decoder's, which the compact one shares). A folder to compare on the frontier (python -m bench.frontier).
define variant_engines
	rm -rf build/ckpt-shapes-v2-$(1) && mkdir -p build/ckpt-shapes-v2-$(1)
	cp -r $(CHECKPOINTS)/clip $(CHECKPOINTS)/prior $(CHECKPOINTS)/decoder $(CHECKPOINTS)/sr build/ckpt-shapes-v2-$(1)/
	set -e; for v in $(or $(2),$(1)); do \
		for s in decoder sr; do if [ -d checkpoints/shapes-v2-$$v/$$s ]; then \
			rm -rf build/ckpt-shapes-v2-$(1)/$$s && cp -r checkpoints/shapes-v2-$$v/$$s build/ckpt-shapes-v2-$(1)/; fi; done; \
		cp checkpoints/shapes-v2-$$v/defaults.json build/ckpt-shapes-v2-$(1)/; done
	$(PY) -m export.all --checkpoints build/ckpt-shapes-v2-$(1) --out engines/shapes-v2-$(1) --name shapes-v2-$(1) $(3)
endef

# The guidance-distilled decoder (configs/shapes-v2-fast.toml).
engines-fast: $(STAMP)
	$(call variant_engines,fast)

# The step-distilled decoder (configs/shapes-v2-steps.toml: the guidance-distilled one's 4 DDIM steps taught in 2).
engines-steps: $(STAMP)
	$(call variant_engines,steps)

# The guided decoder the bundled one is distilled from (configs/shapes-v2.toml; 5 steps x 3 candidates, guided pair).
engines-guided: $(STAMP)
	$(call variant_engines,guided)

# The bundled 3-step decoder with one U-Net block per level down and two up (configs/shapes-v2-compact.toml).
engines-compact: $(STAMP)
	$(call variant_engines,compact)

# The bundled model with its SR step-distilled to one step (configs/shapes-v2-sr1.toml).
engines-sr1: $(STAMP)
	$(call variant_engines,sr1)

engines-sr1-int8: $(STAMP)
	$(call variant_engines,sr1-int8,sr1,--int8 sr0 --int8 decoder)

# The compact decoder with the one-step SR (its defaults: the SR student's), and both with int8 variants.
engines-compact-sr1: $(STAMP)
	$(call variant_engines,compact-sr1,compact sr1)

engines-compact-sr1-int8: $(STAMP)
	$(call variant_engines,compact-sr1-int8,compact sr1,--int8 sr0 --int8 decoder)

# The package's copy of the exported folder (float16-stored weights, no optimised copies): rebuild and commit it
# whenever checkpoints/ or the export change (tests/test_packaged_engines.py fails until then).
package-engines: engines
	$(PY) -m export.package $(ENGINES) --out $(PACKAGED)

# The wheel as a pip user gets it (CI): built from this tree, installed into a fresh venv with no torch, run
# outside the clone; it must find the package's engine folder and write a PNG.
WHEEL_CHECK := out/wheel-check
wheel-check:
	rm -rf $(WHEEL_CHECK) && mkdir -p $(WHEEL_CHECK)
	$(PYTHON) -m venv $(WHEEL_CHECK)/venv
	$(WHEEL_CHECK)/venv/bin/pip wheel -q --no-deps -w $(WHEEL_CHECK) .
	$(WHEEL_CHECK)/venv/bin/pip install -q $(WHEEL_CHECK)/dalle2_rt-*.whl
	cd /tmp && env -u DALLE2_RT_ENGINES DALLE2_RT_CACHE=$(CURDIR)/$(WHEEL_CHECK)/cache \
		$(CURDIR)/$(WHEEL_CHECK)/venv/bin/dalle2-rt info | grep -q '(from the package)'
	cd /tmp && env -u DALLE2_RT_ENGINES DALLE2_RT_CACHE=$(CURDIR)/$(WHEEL_CHECK)/cache \
		$(CURDIR)/$(WHEEL_CHECK)/venv/bin/dalle2-rt "$(PROMPT)" --seed 0 -o $(CURDIR)/$(WHEEL_CHECK)/png
	! $(WHEEL_CHECK)/venv/bin/python -c 'import torch' 2>/dev/null
	@ls -l $(WHEEL_CHECK)/*.whl $(WHEEL_CHECK)/png/*.png

# One image with the default engine folder (dalle2-rt info: $(ENGINES) when built, else the package's copy).
demo: runtime
	@mkdir -p out
	@$(VENV)/bin/dalle2-rt info | sed -n 2p
	@$(VENV)/bin/dalle2-rt "$(PROMPT)" --seed 0 -o out | sed 's/^/wrote /'

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# triton-env: the Triton server tests (tests/test_triton_server.py) run a real tritonserver; without it they skip
test: lint engines triton-env
	OMP_NUM_THREADS=1 $(PY) -m pytest tests

# Triton (README "Serving with Triton"). triton-env: where the Python-backend models of the tritonserver that
# nvidia-pytriton bundles run (its stub needs numpy<2, so not in .venv); the client side is the triton extra.
TRITON_ENV := $(VENV)/triton-env
TRITON_REPO := out/triton-repo

triton-env: $(TRITON_ENV)/.installed

$(TRITON_ENV)/.installed: $(STAMP)
	$(PY) -m pip install -q -e '.[triton]'
	@test -x $(TRITON_ENV)/bin/python || $(PYTHON) -m venv $(TRITON_ENV)
	$(TRITON_ENV)/bin/python -m pip install -q 'numpy<2' 'nvidia-pytriton==0.7.0' onnxruntime pillow regex ftfy
	@touch $@

# The bundled tritonserver on loopback, the bundled model (graphs served by the Python-backend stand-in), one image.
triton-demo: engines triton-env
	$(PY) -m export.triton $(ENGINES) --out $(TRITON_REPO) --platform python --force
	$(PY) -m dalle2_rt.triton.server $(TRITON_REPO) --demo "$(PROMPT)" --seed 0 -o out

# CUDA and TensorRT on a GPU machine (scripts/gpu_check.py, <= 10 minutes); not exercised yet.
gpu-check: engines
	$(PY) scripts/gpu_check.py

.PHONY: triton-env triton-demo gpu-check

# The web page in a real headless browser (tests/test_serve_browser.py): Debian's chromium, installed here when
# missing and run as root (CI), driven by Playwright's Python package; no browser is ever downloaded.
test-browser: $(STAMP)
	@command -v chromium >/dev/null || { test "$$(id -u)" = 0 && apt-get update -qq && apt-get install -y -qq chromium; } \
		|| { echo "test-browser needs Debian's chromium: sudo apt-get install -y chromium"; exit 1; }
	$(PY) -m pip install -q playwright
	DALLE2_RT_REQUIRE_BROWSER=1 OMP_NUM_THREADS=1 $(PY) -m pytest tests/test_serve_browser.py

# Ray Serve on a local loopback instance (tests/test_serve_ray.py): installs the ray extra into the venv; CI runs it.
test-ray: $(STAMP)
	$(PY) -m pip install -q -e '.[ray]'
	DALLE2_RT_REQUIRE_RAY=1 OMP_NUM_THREADS=1 $(PY) -m pytest tests/test_serve_ray.py

# The --from-dalle2-pytorch importer against DALLE2-pytorch itself (tests/test_dalle2_pytorch_import.py): builds
# bench/.venv-dalle2 (DALLE2-pytorch 1.15.6 beside this machine's torch) when missing; CI runs it, never skipping.
test-dalle2-pytorch: $(STAMP)
	$(PY) -m bench.dalle2_venv
	DALLE2_RT_REQUIRE_DALLE2=1 $(PY) -m pytest tests/test_dalle2_pytorch_import.py

bench: engines
	$(PY) -m bench

train: $(STAMP)
	$(VENV)/bin/dalle2-train all --config configs/shapes-v2.toml

# The same recipe on a CUDA GPU (README "Training on a GPU"): the networks on the GPU, the data on the CPU.
# Resumes from runs/shapes-v2 like `make train`; copy runs/shapes-v2 back to continue on the CPU or bundle it.
train-gpu: $(STAMP)
	$(VENV)/bin/dalle2-train all --config configs/shapes-v2.toml --device cuda --threads $$(nproc)

clean:
	rm -rf $(VENV) engines/*/ out
