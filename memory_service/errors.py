"""Errors of the memory service: a gRPC status code plus a machine-readable reason.

Library code raises these; the servicer sends the code and the reason (as a
google.rpc.ErrorInfo, see status.py) and the client turns them back into the same
classes, so callers handle one set of exceptions whether the table is in-process or
remote, and act on `reason`, never on the wording of a message. Only these types become
client-error codes on the wire; any other exception is INTERNAL and logged by the server.
"""

from __future__ import annotations

MESSAGE_ECHO_CHARS = 80  # how much of a request's own string an error message repeats


def shown(value) -> str:
    """repr() of a request-supplied value for an error message, cut to a bounded length."""
    text = repr(value)
    return text if len(text) <= MESSAGE_ECHO_CHARS else f"{text[:MESSAGE_ECHO_CHARS]}...({len(text)} chars)"


class EngramError(Exception):
    """Base class; `code` is the name of a grpc.StatusCode, `reason` an UPPER_SNAKE_CASE cause clients act on."""

    code = "INTERNAL"
    reason = "INTERNAL"

    def __init__(self, message: str = "", reason: str | None = None):
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class InvalidArgument(EngramError, ValueError):
    """Bad shape, dtype, id out of range, non-finite values, malformed bytes."""

    code = "INVALID_ARGUMENT"
    reason = "INVALID_ARGUMENT"


class NotFound(EngramError, LookupError):
    """Unknown table or version."""

    code = "NOT_FOUND"
    reason = "NOT_FOUND"


class AlreadyExists(EngramError):
    """A table with that name exists."""

    code = "ALREADY_EXISTS"
    reason = "TABLE_EXISTS"


class FailedPrecondition(EngramError):
    """Spec fingerprint mismatch, dropping the active version, a store in the wrong state for the call."""

    code = "FAILED_PRECONDITION"
    reason = "FAILED_PRECONDITION"


class StaleShardMap(FailedPrecondition):
    """The request used an old shard map (epoch) or sent rows to a shard that does not hold them: refresh the map."""

    reason = "STALE_SHARD_MAP"


class ResourceExhausted(EngramError):
    """Request or response above the size limit, or a table that does not fit the store."""

    code = "RESOURCE_EXHAUSTED"
    reason = "TOO_LARGE"


class Unauthenticated(EngramError):
    """Write or admin call without a token."""

    code = "UNAUTHENTICATED"
    reason = "TOKEN_MISSING"


class PermissionDenied(EngramError):
    """Write or admin call with a token the server does not accept."""

    code = "PERMISSION_DENIED"
    reason = "TOKEN_INVALID"


class ShardUnavailable(EngramError):
    """A shard cannot serve now but a retry can succeed (rows moving, shard restarting); clients retry."""

    code = "UNAVAILABLE"
    reason = "SHARD_UNAVAILABLE"


class Cancelled(EngramError):
    """The client went away mid-call (a stream it stopped sending); nothing more of it is written."""

    code = "CANCELLED"
    reason = "CANCELLED"


BY_CODE = {cls.code: cls for cls in (InvalidArgument, NotFound, AlreadyExists, FailedPrecondition, ResourceExhausted,
                                     Unauthenticated, PermissionDenied, ShardUnavailable)}
BY_REASON = {StaleShardMap.reason: StaleShardMap}  # reasons with a class of their own


def error_for(code: str, reason: str, message: str) -> EngramError:
    """The exception for a status code and reason received from a server."""
    cls = BY_REASON.get(reason) or BY_CODE.get(code, EngramError)
    error = cls(message, reason=reason or None)
    if cls is EngramError:
        error.code = code
    return error
