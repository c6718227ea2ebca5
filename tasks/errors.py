"""Typed errors. Each message says what is wrong and how to fix it."""

from pathlib import Path


class TesseraError(Exception):
    """Base of every error Tessera raises on purpose."""


class InvalidInputError(TesseraError, ValueError):
    """An argument, file or record is wrong; nothing has been spent yet."""


class InvalidDataError(InvalidInputError):
    """The data is not fit to train on; the message is the report, `evidence` the folder that backs it."""

    def __init__(self, message: str, evidence: Path | None = None):
        super().__init__(message)
        self.evidence = evidence


class TooManyActiveRunsError(TesseraError):
    """The active-run limit is reached; cancel a run or wait for one to finish."""


class RunNotFoundError(TesseraError, LookupError):
    """No run by that name exists on the Prefect server in use."""


class ServiceError(TesseraError):
    """The Prefect server, runner or MLflow store could not be reached or started."""
