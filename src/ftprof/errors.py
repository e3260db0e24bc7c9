"""The errors ftprof raises for user mistakes.

Every subclass of :class:`FtprofError` is a problem with the user's input or environment that a one-line
message can explain; the CLI prints it and exits with code 2. Anything else is a bug and keeps its
traceback.
"""


class FtprofError(Exception):
    """A user-facing problem: the message names what is wrong and how to fix it."""

    exit_code = 2


class ConfigError(FtprofError):
    """A flag or a DeepSpeed config file is invalid."""


class DataError(FtprofError):
    """A dataset can't be loaded or doesn't fit the task."""


class ModelError(FtprofError):
    """A model can't be resolved or loaded."""
