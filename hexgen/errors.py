"""HexGen's own exception classes."""


class HexGenError(Exception):
    """Base class of every error HexGen raises on purpose."""


class ConfigError(HexGenError, ValueError):
    """A configuration or command-line value is invalid; the message names the field and what is allowed."""


class LoadError(HexGenError):
    """A checkpoint could not be read (missing file, missing tensor, shape mismatch)."""


class ModelFetchError(HexGenError):
    """The embedded default model could not be fetched or converted."""
