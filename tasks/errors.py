"""Typed errors. Each message says what is wrong and how to fix it; `retryable` says whether a retry can help."""

from pathlib import Path


class TesseraError(Exception):
    """Base of every error Tessera raises on purpose."""

    retryable = True  # a task that failed with it is retried (tasks.retries); bad input never is


class InvalidInputError(TesseraError, ValueError):
    """An argument, file or record is wrong; nothing has been spent yet."""

    retryable = False


class InvalidDataError(InvalidInputError):
    """The data is not fit to train on; the message is the report, `evidence` the folder that backs it."""

    def __init__(self, message: str, evidence: Path | None = None):
        super().__init__(message)
        self.evidence = evidence


class UnknownArgumentError(InvalidInputError):
    """A call that passes its arguments on to create() was given one that create() does not take."""


class TrainingDiverged(TesseraError):
    """The loss or grad norm went non-finite, or the loss spiked: training stopped without saving more."""

    retryable = False  # from the same checkpoint with the same learning rate it would diverge again


class WorkerFailed(TesseraError):
    """The training worker exited non-zero (killed, out of memory, a crash); the message is its own last words."""


class TooManyActiveRunsError(TesseraError):
    """The active-run limit is reached; cancel a run or wait for one to finish."""


class RunNotFoundError(TesseraError, LookupError):
    """No run by that name exists on the Prefect server in use."""


class StorageError(TesseraError):
    """A folder Tessera writes to is unusable: not a folder, not writable, or its disk full."""

    retryable = False


class ServiceError(TesseraError):
    """The Prefect server, its worker or the MLflow store could not be reached or started."""
