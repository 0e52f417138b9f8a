# Two commands do all the set-up (README.md): each creates the virtualenv in
# .venv and installs the project into it on first use (again when
# pyproject.toml changes).
#   make serve   the server: ./data.fs on 127.0.0.1:8100 (ARGS="..." adds twistd zeotwist options)
#   make test    the test suite (ARGS="..." adds pytest arguments, e.g. ARGS="-x tests/test_config.py")
# editable_mode=compat: twistd finds the plugin (twisted/plugins) in an editable install.

PYTHON ?= python3
VENV ?= .venv
PIP_INSTALL = $(VENV)/bin/pip install -q --config-settings editable_mode=compat -e
ARGS ?=

.PHONY: serve test clean-venv

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(PIP_INSTALL) '.[metrics,tls]'
	$(VENV)/bin/twistd --help | grep -q zeotwist    # the plugin is found
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(PIP_INSTALL) '.[test]'
	touch $@

serve: $(VENV)/.installed
	$(VENV)/bin/twistd -n zeotwist -f data.fs $(ARGS)

test: $(VENV)/.installed-test
	$(VENV)/bin/python -m pytest $(ARGS)

clean-venv:
	rm -rf $(VENV)
