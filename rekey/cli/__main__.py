"""``python -m rekey.cli``: how the dev stack starts the worker and the codec server."""

from rekey.cli import entry

entry()
