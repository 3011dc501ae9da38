"""The errors a user can cause or meet. Each carries the exit code the CLI returns and a
message that says what to do; the CLI prints `error: <message>` and nothing else."""

from __future__ import annotations


class MprnetError(Exception):
    """Base class: a one-line message for the user and the process exit code."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code

    @property
    def message(self) -> str:
        return str(self.args[0])


class InputError(MprnetError):
    """An input image is missing, unreadable or not an image."""


class OutputError(MprnetError):
    """An output cannot be written where asked."""


class CheckpointError(MprnetError):
    """A checkpoint file is missing, corrupt, unsafe or for another architecture or task."""


class ConfigError(MprnetError):
    """A user setting (config file, environment variable, weights spec) cannot be used as written."""


class DeviceError(MprnetError):
    """The requested device or precision is not available here."""


class WeightsUnavailableError(MprnetError):
    """The task's weights could not be obtained (offline, not found, refused, interrupted)."""

    exit_code = 3
