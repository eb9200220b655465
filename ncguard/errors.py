"""Errors a user can act on. The CLI prints their message, never a traceback."""


class NcguardError(Exception):
    """Base class: the message says what is wrong and, where possible, how to fix it."""


class DataError(NcguardError, ValueError):
    """A data SPEC, file or array that cannot be used as given.

    `reason` is a short machine label (e.g. "wrong_shape") where callers count refusals by kind.
    """

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason


class ModelError(NcguardError, ValueError):
    """A model file or run directory that is missing, foreign, tampered with or inconsistent."""


class ConfigError(NcguardError, ValueError):
    """A flag or option value outside what the command accepts."""
