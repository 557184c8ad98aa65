"""The WebRTC front's options: the server's (`WebRTCOptions`, ICE servers and host candidates) and a
stream's (offer fields or query parameters -> a LIVE `StreamConfig`, checked like a gRPC one by
streamer/admission.py), and bounded JSON parsing for everything a browser sends."""

from __future__ import annotations

import json
import math
import reprlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aioice.ice
from aiortc import RTCIceServer

from streamer.proto import pb

DEFAULT_STATS_INTERVAL_S = 1.0  # gRPC's default is 0 (stats after each final); a live page wants a pulse


@dataclass
class WebRTCOptions:
    address: str = "127.0.0.1:8080"  # host:port of the HTTP side (port 0: any free port)
    ice_servers: tuple[str, ...] = ()  # "stun:host:port", "turn:user:pass@host:port?transport=udp"
    ice_hosts: tuple[str, ...] = ()  # gather host candidates only on these local addresses (); all but loopback
    max_body_bytes: int = 64 * 1024  # POST /offer body limit (a browser offer is ~5 KB)
    linger_s: float = 2.0  # after a stream ends, how long the client has to hang up before the server does
    connect_timeout_s: float = 10.0  # an answered offer whose connection is not up by then is dropped

    def __post_init__(self) -> None:
        if not 0 < self.connect_timeout_s <= 3600:
            raise ValueError(f"connect_timeout_s must be in (0, 3600] seconds, got {self.connect_timeout_s!r}")



def _float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a number")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError("expected a finite number")
    return out


def _int(value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError("expected an integer")
    out = int(value)
    if out < 0:
        raise ValueError("expected an integer >= 0")
    return out


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a string")
    return value


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = _text(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true or false")


# offer option -> (StreamConfig field, parser)
OPTIONS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "caption_every_s": ("caption_every_s", _float),
    "sampling_fps": ("sampling_fps", _float),
    "interim": ("interim_results", _bool),
    "draft_tail": ("interim_draft_tail", _bool),
    "max_caption_tokens": ("max_caption_tokens", _int),
    "temperature": ("temperature", _float),
    "top_p": ("top_p", _float),
    "decoding": ("decoding_method", _text),  # a method's name (ModelInfo.methods) or auto
    "instruction": ("instruction", _text),
    "visual_token_budget": ("visual_token_budget", _int),
    "caption_history": ("caption_history", _int),
    "seed": ("seed", _int),
    "stats_interval_s": ("stats_interval_s", _float),
    "label": ("label", _text),
}


def stream_config(options: dict[str, Any]) -> pb.StreamConfig:
    """A LIVE StreamConfig from offer options; ValueError names the bad option."""
    cfg = pb.StreamConfig(mode=pb.STREAM_MODE_LIVE, stats_interval_s=DEFAULT_STATS_INTERVAL_S)
    for name, value in options.items():
        if name not in OPTIONS:
            raise ValueError(f"unknown option {reprlib.repr(name)}; known: {', '.join(OPTIONS)}")
        field_name, parse = OPTIONS[name]
        try:
            setattr(cfg, field_name, parse(value))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"option {name}={reprlib.repr(value)}: {exc}") from exc
    return cfg


MAX_JSON_DEPTH = 4  # an offer or a data-channel message is one object of strings and numbers


def json_depth(text: str) -> int:
    """How deeply arrays and objects nest in a JSON text (brackets inside strings do not count). One pass,
    no recursion: it bounds what json.loads (which recurses) is given."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def loads_client_json(data: str | bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """json.loads for what clients send: ValueError (never RecursionError) for text that is not UTF-8, not
    JSON, or nested deeper than max_depth, which is refused before it is parsed."""
    text = data.decode("utf-8") if isinstance(data, bytes) else data  # UnicodeDecodeError is a ValueError
    if (depth := json_depth(text)) > max_depth:
        raise ValueError(f"JSON nested {depth} levels deep; the limit is {max_depth}")
    return json.loads(text)


def parse_ice_server(spec: str) -> RTCIceServer:
    """'stun:host:port', or 'turn:USER:PASS@host:port[?transport=tcp]' (also stuns:/turns:)."""
    scheme, _, rest = spec.partition(":")
    if scheme not in ("stun", "stuns", "turn", "turns") or not rest:
        raise ValueError(f"ICE server {spec!r} is not stun:HOST:PORT or turn:USER:PASS@HOST:PORT")
    if "@" in rest:
        cred, _, host = rest.rpartition("@")
        user, _, password = cred.partition(":")
        return RTCIceServer(urls=f"{scheme}:{host}", username=user, credential=password)
    return RTCIceServer(urls=spec)


def restrict_host_candidates(addresses: tuple[str, ...]) -> None:
    """Gather ICE host candidates on these local addresses only (process-wide: aioice has no option for it).
    aioice's default skips loopback, so a same-machine peer on 127.0.0.1 needs ("127.0.0.1",)."""
    allowed = list(addresses)

    def get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [a for a in allowed if (use_ipv6 if ":" in a else use_ipv4)]

    aioice.ice.get_host_addresses = get_host_addresses
