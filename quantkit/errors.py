"""Typed errors. The CLI turns each into one line on stderr and a non-zero exit."""
from __future__ import annotations

from pathlib import Path


class QuantkitError(Exception):
    """Base class: a problem with the user's input or environment, reported as one line."""

    exit_code = 2

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = str(path) if path is not None else None
        super().__init__(f"{self.path}: {message}" if self.path else message)


class InputError(QuantkitError):
    """The input model directory (config, shards, index, tokenizer) is missing or malformed."""


class UnsupportedError(QuantkitError):
    """The input is well-formed but describes something quantkit does not handle."""


class OutputError(QuantkitError):
    """The output location cannot be written."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, timeout, a scheduler's stop), raised in the main thread as Ctrl-C is, so that
    the same clean-up runs: no partial output is left."""
