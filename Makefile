# rewardserve: the two commands a newcomer needs are `make serve` and `make test`.
# Both set up everything on a fresh machine (a virtualenv with pinned deps; `make test` also the
# system packages the tests use). torch is pinned in constraints.txt: an unpinned torch pulls
# several GB of CUDA wheels.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP_FLAGS ?= -q --disable-pip-version-check
PYTEST_ARGS ?=

.PHONY: install serve test system-deps lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install $(PIP_FLAGS) -c constraints.txt -e '.[test]'
	touch $@

install: $(VENV)/.installed

serve: install  ## serve the embedded default model on http://127.0.0.1:8000
	$(BIN)/rewardserve serve $(ARGS)

# System packages the tests drive for real (g++ compiles the CPU attention kernel on first use);
# apt only runs when one is missing.
SYSTEM_TOOLS := redis-server prometheus g++
system-deps:
	@missing=""; for t in $(SYSTEM_TOOLS); do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

test: install system-deps  ## install everything the tests need, then run the whole suite
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
