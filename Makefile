# docutray-bridge: `make test` and `make demo` are the two commands that matter (see README.md).
#
# Needs only the machine's python3, Java 17+ and Maven (for Kafka), and root or an installed
# redis-server (for Redis). Everything else lands in .venv, .cache and .stack (all git-ignored).

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
STACK := scripts/stack
# scripts/stack honours STACK_DIR too; the env file it writes lives there.
STACK_ENV := $(or $(STACK_DIR),.stack)/env
# Export the local stack's connection settings (KAFKA_BOOTSTRAP_SERVERS, REDIS_URL, STACK_*).
WITH_STACK_ENV := set -a && source $(STACK_ENV) && set +a
PYTEST_ARGS ?= -ra -n 2 --dist loadfile
BENCH_ARGS ?=
SOAK_ARGS ?=

.PHONY: help venv lock tools unit image stack-up stack-down lint typecheck test demo bench soak clean distclean

help:
	@echo "make test        install, lint, typecheck, stack up, pytest, stack down (always)"
	@echo "make unit        unit tests and the engine in-process: no Kafka, no Redis, ~1 min"
	@echo "make demo        install, stack up, run the bridge end to end against the emulator"
	@echo "make venv        create .venv and install '.[dev]' pinned by constraints.txt"
	@echo "make lock        regenerate constraints.txt from .venv"
	@echo "make image       build the container image localhost/docutray-bridge:dev (docker or podman)"
	@echo "make stack-up    start local Kafka + Redis (scripts/stack up); stack-down stops them"
	@echo "make lint | typecheck | bench | soak | clean | distclean"

venv: $(STAMP)

# Reinstall only when the dependency declarations changed since the last install.
$(STAMP): pyproject.toml $(wildcard constraints.txt)
	@if [ ! -x $(BIN)/python ]; then \
		echo "make: creating $(VENV) with $$($(PYTHON) --version)" >&2; \
		$(PYTHON) -m venv $(VENV); \
	fi
	@echo "make: installing '.[dev]' into $(VENV)" >&2
	$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[dev]' \
		$(if $(wildcard constraints.txt),-c constraints.txt)
	@touch $(STAMP)

lock:
	@test -x $(BIN)/pip || { echo "make lock: no $(VENV) yet; run 'make venv' first" >&2; exit 1; }
	$(BIN)/pip freeze --exclude-editable --disable-pip-version-check > constraints.txt.tmp
	@mv constraints.txt.tmp constraints.txt
	@echo "make: wrote constraints.txt ($$(wc -l < constraints.txt) pins)" >&2

# helm + promtool for tests/test_deploy.py and the Prometheus server for
# tests/test_prometheus_live.py, built once from the Go module proxy into .cache/bin (minutes on
# a cold Go cache, seconds after). `make test` starts this in the background so the build
# overlaps the rest of the suite; those tests run last and wait for its lock.
tools:
	scripts/helm --path >/dev/null
	scripts/promtool --path >/dev/null
	scripts/prometheus --path >/dev/null

# The container image localhost/docutray-bridge:dev (scripts/image: docker or podman; a Python
# base made from Debian's packages when no registry answers, cached under .cache/image).
# `make test` starts it in the background too; tests/test_image.py waits for its lock.
image:
	scripts/image

stack-up:
	$(STACK) up

stack-down:
	$(STACK) down

# The fast loop: pure logic and the engine in-process (Kafka and DocuTray faked); no broker,
# no Redis, about a minute. The end-to-end suites run in `make test`.
UNIT_TESTS := tests/test_dedupe.py tests/test_engine.py tests/test_plan_engine.py tests/test_pending.py \
	tests/test_intake.py tests/test_outcomes.py tests/test_messages.py tests/test_schemas.py \
	tests/test_scheduler.py tests/test_ratelimit_policy.py tests/test_ratelimit_local.py \
	tests/test_config.py tests/test_logging.py tests/test_docutray_client.py tests/test_readme.py \
	tests/test_emulator_units.py tests/test_health.py tests/chaos/test_checker.py tests/test_demo_dir.py \
	tests/test_judge_record.py tests/test_transaction.py tests/test_ownership.py \
	tests/test_pending_ids.py tests/test_devkit.py

unit: venv
	env -u KAFKA_BOOTSTRAP_SERVERS -u REDIS_URL $(BIN)/pytest -q -n 2 $(UNIT_TESTS)

lint: venv
	$(BIN)/ruff check . $(STACK)
	$(BIN)/ruff format --check . $(STACK)

typecheck: venv
	$(BIN)/mypy --strict service/
	$(BIN)/mypy --strict $(STACK)

# The stack comes down on every exit path (pass, fail, Ctrl-C, a failed `up`), and the exit
# code is pytest's: any non-zero, including 5 (no tests collected), fails the target.
test: venv
	@mkdir -p .cache; \
	$(MAKE) --no-print-directory tools > .cache/tools-build.log 2>&1 & tools_pid=$$!; \
	scripts/image > .cache/image-build.log 2>&1 & image_pid=$$!; \
	trap 'rc=$$?; kill $$tools_pid $$image_pid 2>/dev/null || true; $(STACK) down || true; exit $$rc' EXIT; \
	trap 'exit 130' INT TERM; \
	$(MAKE) --no-print-directory lint typecheck; \
	$(STACK) up; \
	$(WITH_STACK_ENV); \
	$(BIN)/pytest $(PYTEST_ARGS)

demo: venv stack-up
	$(WITH_STACK_ENV); $(BIN)/docutray-bridge demo

bench: venv stack-up
	$(WITH_STACK_ENV); $(BIN)/python -m bench.run $(BENCH_ARGS)

soak: venv stack-up
	$(WITH_STACK_ENV); $(BIN)/python -m bench.soak $(SOAK_ARGS)

# Stops the stack and deletes its data; keeps .venv and the resolved Kafka jars (.cache).
clean:
	$(STACK) down --wipe
	rm -rf build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache .hypothesis
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) .cache
