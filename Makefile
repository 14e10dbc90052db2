# One command each for a fresh machine: `make serve` runs the gateway, `make test` the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install serve test lint check clean

$(STAMP): pyproject.toml clients/python/pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt \
		-e '.[test]' -e 'clients/python[test]'
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/llm-gateway serve $(ARGS)

# scripts/test-tools first: the system tools some tests drive (wrk, nginx, Prometheus,
# redis-server), installed when run as root with apt-get, else named in one line (those skip).
test: $(STAMP)
	scripts/test-tools
	$(PY) -m pytest $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

check: lint test

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

# The benchmark suite (bench/README.md): the full run takes minutes on an idle machine;
# bench-smoke is the same code with tiny counts (under a minute), as the tests run it.
.PHONY: bench bench-smoke
bench: $(STAMP)
	$(PY) -m bench.suite $(ARGS)

bench-smoke: $(STAMP)
	$(PY) -m bench.suite --smoke $(ARGS)
