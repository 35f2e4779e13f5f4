# The two commands of the README:
#   make run    start everything (embedded nats-server, router on :8000, prefill + decode workers, SmolLM2)
#   make test   run the whole test suite (what CI runs)
# Both set up what they need first (virtualenv, packages, models) and are idempotent.

VENV   ?= .venv
STAMP  := $(VENV)/.kvrelay-installed
ARGS   ?=
PYTEST_ARGS ?=

.PHONY: run test setup models clean-venv

run: models
	$(VENV)/bin/kvrelay up $(ARGS)

test: models
	$(VENV)/bin/pytest $(PYTEST_ARGS)

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py deploy/bootstrap.sh $(wildcard schemas/native/*.c router/native/*.[ch])
	bash deploy/bootstrap.sh $(VENV)

models: setup
	$(VENV)/bin/kvrelay model prepare smollm2 tiny

clean-venv:
	rm -rf $(VENV)
