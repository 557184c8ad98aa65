"""The gRPC boundary of sparrow.v1.Captioner: every request message is decoded here, and a message that
cannot be (bytes that are not the message, invalid UTF-8 in a string field, over the server's message
size limit) becomes a `Fatal` value (streamer/results.py) instead of an exception inside grpc.

grpc itself turns a deserializer's exception into UNKNOWN (and logs a traceback), and a message over its
own `grpc.max_receive_message_length` into RESOURCE_EXHAUSTED before the service sees it, so neither
could carry the in-band StreamError{FATAL} copy. Here the RPC handlers receive the Fatal and end
the call with its status (INVALID_ARGUMENT, or RESOURCE_EXHAUSTED naming the limit) like any other
fatal error. grpc's own limit is set to `transport_receive_limit`, above the server's, so that only a
message over that (twice the server's limit) is refused by grpc without the copy.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
from google.protobuf.message import DecodeError, Message

from streamer.proto import SERVICE_NAME, pb
from streamer.results import Fatal


def transport_receive_limit(max_message_bytes: int) -> int:
    """grpc's receive limit for a server whose own limit is max_message_bytes: messages in between reach
    the service and are refused there, with the in-band FATAL copy."""
    return min(2 * max_message_bytes, 2**31 - 1)


def guarded_deserializer(cls: type[Message], max_message_bytes: int) -> Callable[[bytes], Message | Fatal]:
    name = cls.DESCRIPTOR.name

    def deserialize(data: bytes) -> Message | Fatal:
        if len(data) > max_message_bytes:
            return Fatal(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"a {name} of {len(data)} bytes is over the server's max message size of {max_message_bytes} bytes",
            )
        try:
            return cls.FromString(data)
        except DecodeError as exc:  # not the message, or a string field that is not UTF-8
            return Fatal(grpc.StatusCode.INVALID_ARGUMENT, f"undecodable {name} message: {exc}")

    return deserialize


def add_captioner_to_server(servicer: object, server: grpc.aio.Server, max_message_bytes: int) -> None:
    """Register every Captioner RPC of the contract with guarded request decoding (what the generated
    `add_CaptionerServicer_to_server` does, with `guarded_deserializer` in place of `FromString`)."""
    factories = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["Captioner"].methods:
        request_cls = getattr(pb, method.input_type.name)
        response_cls = getattr(pb, method.output_type.name)
        factory = factories[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = factory(
            getattr(servicer, method.name),
            request_deserializer=guarded_deserializer(request_cls, max_message_bytes),
            response_serializer=response_cls.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
