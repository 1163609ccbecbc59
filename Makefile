# Two commands do all the set-up on a fresh machine (Debian, root):
#   make run    install, build the default image if missing, start the daemon (127.0.0.1:8080)
#   make test   install, then run the whole test suite
CONFIG ?= sandkasten.yaml
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test install deps assets images bench clean

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

bench: images
	$(BIN)/python tools/bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .cache sandkasten/console/node_modules
