"""Domain errors: a message and a machine-readable ``reason``, no transport status.

The API maps each class to an HTTP status (``app.errors``); the worker and the command lines
report the reason and the message as they are.
"""

from __future__ import annotations


class DomainError(Exception):
    """An error the caller can act on, named by ``reason``."""

    reason = "error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason


class InvalidInputError(DomainError):
    """The request's data cannot be used (shape, decoding, range, NaN/inf, unknown column)."""

    reason = "invalid_input"


class LimitExceededError(DomainError):
    """A request asks for more than the configured limits allow (inputs, bytes, work)."""

    reason = "too_many_inputs"


class NotFoundError(DomainError):
    """No such model, version or job."""

    reason = "not_found"


class ConflictError(DomainError):
    """The request contradicts the current state (a finished job, a corrupt version)."""

    reason = "conflict"


class UnavailableError(DomainError):
    """A dependency (a model, the job queue, the store) cannot serve right now."""

    reason = "unavailable"
