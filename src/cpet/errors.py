"""Errors the CLI turns into one clear line and a non-zero exit."""


class CpetError(Exception):
    """Base class: a user-facing problem (bad input, bad config, failed gate)."""


class ConfigError(CpetError):
    """A params.yaml value is missing, unknown or of the wrong type; the message names the key."""


class DataError(CpetError):
    """Input data is malformed or failed validation; the message names file/row/expectation."""


class Unsupported(CpetError):
    """A method cannot compress this model (no layer to work on, or a shape it cannot rewrite);
    the message names the model class and the method."""
