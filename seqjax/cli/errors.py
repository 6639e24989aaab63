"""The error type of the ``seqjax`` command."""

__all__ = ["CLIError"]


class CLIError(Exception):
    """A user-facing error: printed as ``seqjax: error: <message>``, exit code 2."""
