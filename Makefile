# `make run`: set up and serve on SQLite. `make test`: set up and run every test.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export FLASK_APP := wsgi

.PHONY: run test bench

$(BIN)/.installed: requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

# Serves 127.0.0.1 unless HOST is set (the Procfile keeps 0.0.0.0); PORT, default 8000.
run: $(BIN)/.installed
	$(BIN)/flask db upgrade
	@$(BIN)/flask tokens bootstrap | sed 's/^/Admin token (shown once, keep it): /'
	HOST=$${HOST:-127.0.0.1} $(BIN)/gunicorn -c gunicorn.conf.py wsgi:app

test: $(BIN)/.installed
	$(BIN)/python -m pytest

bench: $(BIN)/.installed
	$(BIN)/python -m bench
	$(BIN)/python -m bench.held_polls
	$(BIN)/python -m bench.gc_sweep
