"""Errors a user can act on. The CLI prints their message, never a traceback."""


class NcguardError(Exception):
    """Base class: the message says what is wrong and, where possible, how to fix it."""


class DataError(NcguardError, ValueError):
    """A data SPEC, file or array that cannot be used as given."""


class ModelError(NcguardError, ValueError):
    """A model file or run directory that is missing, foreign, tampered with or inconsistent."""


class ConfigError(NcguardError, ValueError):
    """A flag or option value outside what the command accepts."""
