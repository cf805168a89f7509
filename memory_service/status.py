"""Errors on the wire: our exceptions as gRPC statuses with a google.rpc.ErrorInfo reason, and back.

The server aborts with the error's code, a bounded message and an ErrorInfo
(`reason`, domain "engram.v1") in the standard `grpc-status-details-bin` trailer, which
every gRPC language's status helpers read. The client rebuilds the same exception
class from the code and the reason; the message is for people only.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from memory_service.errors import EngramError, error_for

DOMAIN = "engram.v1"
MAX_MESSAGE_CHARS = 2000  # status messages travel in a header: keep them far below gRPC's metadata limit


def status_of(error: EngramError) -> grpc.Status:
    """The gRPC status (code, bounded message, ErrorInfo reason) that carries an error."""
    message = str(error)
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + "..."
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN))
    return rpc_status.to_status(status_pb2.Status(code=getattr(code_pb2, error.code), message=message, details=[detail]))


def abort(context: grpc.ServicerContext, error: EngramError) -> None:
    """End the call with the error's status (raises, as context.abort does)."""
    context.abort_with_status(status_of(error))


def reason_of(call) -> str:
    """The ErrorInfo reason a failed call carries ('' when it carries none, e.g. a transport error)."""
    try:
        status = rpc_status.from_call(call)
    except (ValueError, AttributeError):  # trailers that do not agree with the call's code, or no trailers at all
        return ""
    if status is None:
        return ""
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            if info.domain == DOMAIN:
                return info.reason
    return ""


def error_from_rpc(e: grpc.RpcError, where: str = "") -> EngramError:
    """Our exception for a failed call: the class follows the status code and the ErrorInfo reason."""
    code = e.code() if isinstance(e, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = e.details() if isinstance(e, grpc.Call) else str(e)
    return error_for(code.name, reason_of(e), f"{where}{details}")
