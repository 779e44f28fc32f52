"""Server interceptors: metrics around every unary RPC, readiness, domain errors ->
status codes (streaming RPCs too: ``apcm.v1.ClusterService`` moves banks as streams).

Domain code raises ``apcm.server.errors.ApcmError`` subclasses; ``ErrorInterceptor``
turns them into gRPC statuses (by ``rpc.status.abort_with_error``). Anything else is a
server bug: it is logged with its traceback and the client gets ``INTERNAL`` with a
generic message.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from apcm.wire.tensors import TensorFormatError

from ..errors import ApcmError, FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable
from ..metrics import Metrics
from ..rpc.status import abort_with_error

log = logging.getLogger(__name__)

Behavior = Callable[[Any, grpc.ServicerContext], Any]
Continuation = Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None]


def _wrap_unary(
    handler: grpc.RpcMethodHandler | None, wrap: Callable[[Behavior], Behavior]
) -> grpc.RpcMethodHandler | None:
    if handler is None or handler.unary_unary is None:
        return handler
    return grpc.unary_unary_rpc_method_handler(
        wrap(handler.unary_unary),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


# (request streams, response streams) -> the handler's behaviour attribute, its factory
_KINDS = {
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


def _wrap_any(
    handler: grpc.RpcMethodHandler | None, wrap: Callable[[Behavior], Behavior],
    wrap_streaming: Callable[[Behavior], Behavior],
) -> grpc.RpcMethodHandler | None:
    """``handler`` of any kind with its behaviour wrapped: by ``wrap`` when it answers
    one message, by ``wrap_streaming`` when it returns an iterator of them."""
    if handler is None:
        return None
    streams = bool(handler.request_streaming), bool(handler.response_streaming)
    attribute, factory = _KINDS[streams]
    behavior = getattr(handler, attribute)
    if behavior is None or getattr(behavior, "experimental_non_blocking", False):
        return handler  # a callback-style stream (grpc health's Watch) has no iterator to wrap
    return factory(
        (wrap_streaming if streams[1] else wrap)(behavior),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def method_name(details: grpc.HandlerCallDetails) -> str:
    return details.method.rsplit("/", 1)[-1]


def _status_of(context: grpc.ServicerContext, raised: bool) -> grpc.StatusCode:
    code = context.code()
    if code is None:
        return grpc.StatusCode.UNKNOWN if raised else grpc.StatusCode.OK
    return code


class MetricsInterceptor(grpc.ServerInterceptor):
    """Counts, times and sizes every unary RPC, labelled by method and final code."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        method = method_name(handler_call_details)
        m = self.metrics

        def wrap(behavior: Behavior) -> Behavior:
            def observed(request: Any, context: grpc.ServicerContext) -> Any:
                m.in_flight.labels(method).inc()
                m.message_bytes.labels(method, "in").inc(request.ByteSize())
                start = time.perf_counter()
                raised = False
                try:
                    response = behavior(request, context)
                    m.message_bytes.labels(method, "out").inc(response.ByteSize())
                    return response
                except BaseException:
                    raised = True
                    raise
                finally:
                    m.latency.labels(method).observe(time.perf_counter() - start)
                    m.requests.labels(method, _status_of(context, raised).name).inc()
                    m.in_flight.labels(method).dec()

            return observed

        return _wrap_unary(continuation(handler_call_details), wrap)


@contextlib.contextmanager
def _errors_mapped(context: grpc.ServicerContext, method: str) -> Iterator[None]:
    try:
        yield
    except ApcmError as e:
        abort_with_error(context, e)
    except TensorFormatError as e:
        abort_with_error(context, InvalidArgument(str(e)))
    except Exception:
        if context.code() not in (None, grpc.StatusCode.OK):
            raise  # the handler aborted on purpose
        log.exception("unhandled error in %s", method)
        abort_with_error(context, ApcmError("internal server error; see the server log"))


class ErrorInterceptor(grpc.ServerInterceptor):
    """Maps domain errors to their status codes and hides internal failures."""

    def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method

        def wrap(behavior: Behavior) -> Behavior:
            def mapped(request: Any, context: grpc.ServicerContext) -> Any:
                with _errors_mapped(context, method):
                    return behavior(request, context)

            return mapped

        def wrap_streaming(behavior: Behavior) -> Behavior:
            def mapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                with _errors_mapped(context, method):
                    yield from behavior(request, context)

            return mapped

        return _wrap_any(continuation(handler_call_details), wrap, wrap_streaming)


# Methods that only look at the server answer while it starts, restores or stops.
ALWAYS_ANSWERED = frozenset({"GetModelInfo", "ListBanks", "DescribeBank", "ListSnapshots",
                             "GetClusterInfo"})


class ReadinessInterceptor(grpc.ServerInterceptor):
    """Refuses every other method until the service is ready.

    Args:
        is_ready: tells whether the service serves now (recovered, warmed up, not
            restoring or stopping).
        service_prefix: full name of the guarded service, e.g. "/apcm.v1.MemoryService/",
            or a tuple of them; health and reflection are never guarded.
        transient: refuse with UNAVAILABLE, which clients retry, instead of
            FAILED_PRECONDITION. A cluster pod's refusal is transient (another pod, or
            this one in a moment, serves the call); a single server's restore is not.
    """

    def __init__(self, is_ready: Callable[[], bool],
                 service_prefix: str | tuple[str, ...], transient: bool = False) -> None:
        self.is_ready = is_ready
        self.prefix = service_prefix
        self.refusal: type[ApcmError] = Unavailable if transient else FailedPrecondition

    def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        full = handler_call_details.method
        if not full.startswith(self.prefix) or method_name(handler_call_details) in \
                ALWAYS_ANSWERED:
            return handler

        def wrap(behavior: Behavior) -> Behavior:
            def guarded(request: Any, context: grpc.ServicerContext) -> Any:
                if not self.is_ready():
                    raise self.refusal(
                        "the server is not ready (starting, restoring or stopping)")
                return behavior(request, context)

            return guarded

        # a stream's iterator is made when the call starts: the same check suits it
        return _wrap_any(handler, wrap, wrap)


class Undecodable:
    """Stands in for a request whose bytes do not parse as its message type.

    grpc deserializes a request before any interceptor's behaviour runs, and a
    deserializer that raises makes grpc answer INTERNAL itself. Returning this
    instead lets the RPC go through the interceptors (metrics, auth, errors) and be
    refused with INVALID_ARGUMENT.
    """

    def __init__(self, message_name: str, size: int, error: Exception) -> None:
        self.message_name = message_name
        self.size = size
        self.error = error

    def ByteSize(self) -> int:  # noqa: N802  (the protobuf message method MetricsInterceptor calls)
        return self.size


class Oversized(Undecodable):
    """Stands in for a request over ``max_message_bytes``, left unparsed."""


def _safe_deserializer(deserialize: Callable[[bytes], Any],
                       max_bytes: int) -> Callable[[bytes], Any]:
    message_name = getattr(getattr(deserialize, "__self__", None), "__name__", "the request")

    def safe(raw: bytes) -> Any:
        if len(raw) > max_bytes:
            return Oversized(message_name, len(raw), ValueError("over max_message_bytes"))
        try:
            return deserialize(raw)
        except (DecodeError, UnicodeDecodeError, ValueError) as e:
            return Undecodable(message_name, len(raw), e)

    return safe


class DecodeErrorInterceptor(grpc.ServerInterceptor):
    """Undecodable requests (not protobuf, invalid UTF-8 in a string) -> INVALID_ARGUMENT;
    requests over ``max_message_bytes`` -> RESOURCE_EXHAUSTED naming that limit.

    gRPC's own receive limit sits above ``max_message_bytes`` (``app.build_server``),
    so an oversized request reaches this check: gRPC's refusal names no setting, and
    some clients report only "Bandwidth exhausted or memory limit exceeded".

    Must come after ``ErrorInterceptor`` in the server's interceptor list, so its
    domain errors are mapped to a status like any other.

    Args:
        max_message_bytes: the server's ``max_message_bytes`` setting.
    """

    def __init__(self, max_message_bytes: int) -> None:
        self.max_message_bytes = max_message_bytes

    def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None or handler.request_deserializer is None:
            return handler

        def checked(request: Any, context: grpc.ServicerContext) -> Any:
            if isinstance(request, Oversized):
                raise ResourceExhausted(
                    f"the {request.message_name} message is {request.size} bytes, over the "
                    f"server's max_message_bytes of {self.max_message_bytes} (--max-message-"
                    "bytes, env APCM_MAX_MESSAGE_BYTES): send fewer items per call",
                    limit="max_message_bytes")
            if isinstance(request, Undecodable):
                raise InvalidArgument(
                    f"the request is not a valid {request.message_name} protobuf message "
                    f"({request.size} bytes; strings must be valid UTF-8)")
            return handler.unary_unary(request, context)

        return grpc.unary_unary_rpc_method_handler(
            checked,
            request_deserializer=_safe_deserializer(handler.request_deserializer,
                                                    self.max_message_bytes),
            response_serializer=handler.response_serializer,
        )
