# Two commands do all the set-up on a fresh machine (Debian, root):
#   make run    install, build the default image if missing, start the daemon (127.0.0.1:8080)
#   make test   install, then run the whole test suite
#   make lint   ruff, mypy and the import contracts (pyproject.toml); CI runs it before make test
CONFIG ?= sandkasten.yaml
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint install deps assets images bench clean

$(BIN)/.installed: pyproject.toml
	tools/bootstrap
	@touch $@

install: $(BIN)/.installed deps assets

deps:
	@tools/debian-deps

assets: deps
	@tools/console-assets

images: install
	$(BIN)/imgbuilder build --config $(CONFIG) --default

run: images
	$(BIN)/sandkasten --config $(CONFIG)

test: install
	$(BIN)/pytest $(PYTEST_ARGS)

# every checker runs even when one fails, so one run reports everything; fails if any failed
LINT_PATHS := sandkasten runner migrations tools/benchlib tools/bench tools/crashtest tools/crashcluster.py
lint: $(BIN)/.installed
	@rc=0; \
	echo "lint: ruff" && $(BIN)/ruff check $(LINT_PATHS) || rc=1; \
	echo "lint: mypy" && $(BIN)/mypy || rc=1; \
	echo "lint: import contracts" && $(BIN)/lint-imports --no-cache || rc=1; \
	exit $$rc

bench: images
	$(BIN)/python tools/bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .cache sandkasten/console/node_modules
