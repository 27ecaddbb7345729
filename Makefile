# `make run`: set up and serve on SQLite. `make test`: set up and run every test, on both stacks.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export FLASK_APP := wsgi

.PHONY: run test test-quick test-scale-out bench

$(BIN)/.installed: requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

# Serves 127.0.0.1 unless HOST is set (the Procfile keeps 0.0.0.0); PORT, default 8000.
run: $(BIN)/.installed
	$(BIN)/flask db upgrade
	@$(BIN)/flask tokens bootstrap | sed 's/^/Admin token (shown once, keep it): /'
	HOST=$${HOST:-127.0.0.1} $(BIN)/gunicorn -c gunicorn.conf.py wsgi:app

# Both stacks: SQLite + the memory bus, then PostgreSQL + Redis (live servers
# with two workers). `make test-quick` is the first half alone: nothing to install.
test: test-quick test-scale-out

test-quick: $(BIN)/.installed
	SWITCHBOARD_TEST_DB=sqlite SWITCHBOARD_TEST_BUS=memory $(BIN)/python -m pytest $(PYTEST_ARGS)

test-scale-out: $(BIN)/.installed
	bash tests/support/services.sh
	SWITCHBOARD_TEST_DB=postgres SWITCHBOARD_TEST_BUS=redis $(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(BIN)/.installed
	$(BIN)/python -m bench
	$(BIN)/python -m bench.held_polls
	$(BIN)/python -m bench.gc_sweep
	$(BIN)/python -m bench.pool
	$(BIN)/python -m bench.paced
	$(BIN)/python -m bench.embeddings
