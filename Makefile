# The two commands of the README: `make demo` (the main job) and `make test`.
# Both install the project into .venv first; nothing else needs to be on the machine but Python 3.10+.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	bash scripts/ensure-broker.sh || true
	$(BIN)/std-daq demo

test: $(STAMP)
	bash scripts/ensure-broker.sh
	@# tests/std_web drives Debian's chromium with playwright (never a browser playwright downloads); without
	@# it those tests skip (fail under CI=true).
	test -x /usr/bin/chromium || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
		|| echo "make test: could not install chromium from Debian; the browser tests will not run"
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
