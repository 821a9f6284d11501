"""Exception types raised by residual_gpu.

Every validation error names the argument and the value it rejected; the classes
subclass the builtin exceptions a caller would already catch.
"""


class ResidualGPUError(Exception):
    """Base class for every error raised on purpose by residual_gpu."""


class InvalidArgumentError(ResidualGPUError, ValueError):
    """An argument has the right type but a value the library cannot use."""


class InvalidTypeError(ResidualGPUError, TypeError):
    """An argument has a type the library cannot use."""


class BackendUnavailableError(ResidualGPUError, RuntimeError):
    """A compute backend was asked for by name but cannot run here.

    The message says what is missing (a package and the extra that installs it,
    or a device) so the user can act on it.
    """


class IndexFormatError(ResidualGPUError, ValueError):
    """A saved index file is corrupted, truncated or from an incompatible version."""
