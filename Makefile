# Enclave: the two commands are `make demo` and `make test` (see README.md).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch lies on this machine's disk; a plain `torch` would pull a
# multi-GB CUDA build. GPU machines override, e.g.
#   make test TORCH_INSTALL="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_INSTALL ?= torch==2.13.0
# The venv is (re)installed only when pyproject.toml changes: the stamp carries its hash.
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-16)
PORT ?= 8000

.PHONY: demo test lint venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_INSTALL)
	$(PY) -m pip install --quiet -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	bash tests/console/install_browser.sh $(PY)
	$(PY) -m pytest

demo: $(STAMP)
	$(PY) manage.py demo $(if $(SERVE),--serve --port $(PORT))

clean:
	rm -rf var
