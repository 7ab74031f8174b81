"""User-facing errors: the CLI prints these without a traceback and exits 2."""


class GigajaxError(Exception):
    """A user error (bad config, bad data, missing file) with a message saying how to fix it."""

    exit_code = 2  # what the CLI exits with


class ConfigError(GigajaxError):
    """A config field has a value that is not allowed; the message names the field."""


class DataError(GigajaxError):
    """Input data is missing or malformed."""
