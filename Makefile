# Two entry points for a fresh machine; each installs what it needs into .venv first.
#   make demo   - the main job on the embedded data
#   make test   - the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.graphsurgeon-installed

.PHONY: demo test test-all lint install clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[test,lint]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m graphsurgeon demo

test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -n 2 -q -p no:cacheprovider tests

# the slow tests too (zoo sample beyond the default, long training checks)
test-all: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -n 2 -q -p no:cacheprovider --runslow tests

# ruff under the committed configuration (pyproject.toml); CI runs it before the tests
lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
