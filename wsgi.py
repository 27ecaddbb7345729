"""The one module-level app, for gunicorn (`wsgi:app`) and the `flask` command."""
import gc

# Importing and creating the app makes some hundred thousand objects and
# almost no garbage: the collector's passes over them cost a `flask` command
# (a cron line's `flask gc-sweep`) a tenth of its start, and find nothing.
gc.disable()
try:
    from app import create_app

    app = create_app()
finally:
    gc.enable()
