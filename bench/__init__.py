"""Switchboard's benchmark: `python -m bench` (or `make bench`). See __main__."""
