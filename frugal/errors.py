"""Exceptions that reach users. Each names the offending value; none is raised for an internal bug
(those are `assert`s)."""


class FrugalError(Exception):
    """Base class for every error frugal raises on purpose."""


class ModelLoadError(FrugalError):
    """A checkpoint cannot be found, read or understood (missing file, garbled JSON or safetensors,
    unknown architecture, missing weight)."""


class InvalidRequestError(FrugalError, ValueError):
    """A request or its sampling parameters are invalid (bad value, prompt too long, ...)."""


class ConfigError(FrugalError, ValueError):
    """An engine option is invalid (unknown dtype or device, unparsable memory size, ...)."""
