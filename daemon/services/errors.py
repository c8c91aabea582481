"""The process's own error: why the daemon cannot start, and what to do about it."""

from __future__ import annotations


class StartupError(Exception):
    """The daemon cannot start; the message says what failed and what to do."""
