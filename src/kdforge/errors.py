"""User-facing errors: one line that names the cause and the fix."""


class KDForgeError(Exception):
    """Bad input or a stopped run. The CLI prints the message as one line and exits non-zero."""
