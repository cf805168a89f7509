"""Errors of the memory service, each carrying the gRPC status it maps to.

Library code raises these; the gRPC servicer turns them into status codes and the
client turns status codes back into them, so callers handle one set of exceptions
whether the table is in-process or remote.
"""

from __future__ import annotations


class EngramError(Exception):
    """Base class; `code` is the name of a grpc.StatusCode."""

    code = "INTERNAL"


class InvalidArgument(EngramError, ValueError):
    """Bad shape, dtype, id out of range, malformed bytes."""

    code = "INVALID_ARGUMENT"


class NotFound(EngramError, LookupError):
    """Unknown table or version."""

    code = "NOT_FOUND"


class AlreadyExists(EngramError):
    """A table with that name exists."""

    code = "ALREADY_EXISTS"


class FailedPrecondition(EngramError):
    """Spec fingerprint mismatch, stale shard map, dropping the active version."""

    code = "FAILED_PRECONDITION"


class StaleShardMap(FailedPrecondition):
    """The request used an old shard map (epoch) or sent rows to a shard that does not hold them."""


class ResourceExhausted(EngramError):
    """Request or response above the size limit."""

    code = "RESOURCE_EXHAUSTED"


class Unauthenticated(EngramError):
    """Write or admin call without a valid token."""

    code = "UNAUTHENTICATED"


class ShardUnavailable(EngramError):
    """A shard did not answer within the retry budget."""

    code = "UNAVAILABLE"


BY_CODE = {cls.code: cls for cls in (InvalidArgument, NotFound, AlreadyExists, FailedPrecondition,
                                     ResourceExhausted, Unauthenticated, ShardUnavailable)}
