# `make demo` and `make test` each set up the virtualenv they need in .venv, from nothing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# On a CPU machine pin the CPU build of torch (where a local wheel exists pip takes it; elsewhere
# add --index-url https://download.pytorch.org/whl/cpu to PIP_FLAGS to avoid the CUDA build).
TORCH ?= torch==2.13.0
TRITON ?= triton==3.9.0
PIP_FLAGS ?=

.PHONY: demo test clean

demo: $(VENV)/.runtime
	$(VENV)/bin/moshi-fast demo

test: $(VENV)/.test
	$(PY) -m pytest -q

$(VENV)/.runtime: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(PIP_FLAGS) "$(TORCH)" "$(TRITON)"
	$(PY) -m pip install -q -e .
	touch $@

# Kyutai's moshi pins an old torch: it is installed without its dependencies (it imports only
# torch, numpy, einops, safetensors, sentencepiece and huggingface_hub, all in the test extra).
$(VENV)/.test: $(VENV)/.runtime
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps moshi==0.2.13
	touch $@

clean:
	rm -rf $(VENV) moshi_demo_out.wav
