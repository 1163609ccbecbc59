# Two commands do all the set-up on a fresh machine (Debian, root):
#   make run    install, build the default image if missing, start the daemon (127.0.0.1:8080)
#   make test   install, then run the whole test suite: the unit tier, then the system tier
#               in parallel workers (README: Tests)
#   make lint   ruff, mypy and the import contracts (pyproject.toml)
CONFIG ?= sandkasten.yaml
VENV := .venv
BIN := $(VENV)/bin
# the system tier's workers (pytest-xdist); measured on a 2-core VM (README: Tests)
XDIST ?= -n 2 --dist load

.PHONY: run test test-unit test-system lint install deps assets images bench clean

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

# pytest exits 5 when it selects no test: fine for one tier (PYTEST_ARGS may name tests of the
# other tier only), a failure when neither tier had a test (a broken setup, not a pass).
# A failing unit tier stops before the system tier.
test: install
	@u=0; $(BIN)/pytest -m unit $(PYTEST_ARGS) || u=$$?; \
	if [ $$u != 0 ] && [ $$u != 5 ]; then exit $$u; fi; \
	s=0; $(BIN)/pytest -m system $(XDIST) $(PYTEST_ARGS) || s=$$?; \
	if [ $$u = 5 ] && [ $$s = 5 ]; then echo "make test: pytest collected no tests" >&2; exit 5; fi; \
	if [ $$s = 5 ]; then exit 0; fi; exit $$s

test-unit: install
	@$(BIN)/pytest -m unit $(PYTEST_ARGS) || [ $$? = 5 ]

test-system: install
	@$(BIN)/pytest -m system $(XDIST) $(PYTEST_ARGS) || [ $$? = 5 ]

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
