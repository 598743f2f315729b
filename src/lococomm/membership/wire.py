"""Coordinator <-> worker wire format: length-prefixed JSON frames and the HMAC handshake.

A frame is a 4-byte big-endian length followed by that many bytes of UTF-8 JSON encoding one
object with at least ``{"v": PROTOCOL_VERSION, "type": <str>}``. Frames longer than
``MAX_FRAME_BYTES`` are refused before any byte of the body is read, so a peer can never make
the other side buffer more than that. Nothing here unpickles or evaluates anything.

Authentication is a shared-token challenge/response in both directions: the server sends a
random nonce, the worker answers ``HMAC-SHA256(token, "worker" | server_nonce | client_nonce)``
and the server proves itself with ``HMAC-SHA256(token, "server" | client_nonce | server_nonce)``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
import struct
from typing import Any

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 1 << 20  # 1 MiB: far above any legitimate message, small enough to be harmless
_HEADER = struct.Struct(">I")


class ProtocolError(Exception):
    """A peer sent something that is not a valid frame/message of this protocol."""


def encode_frame(message: dict[str, Any]) -> bytes:
    """Serialise one message (adds the protocol version) into a length-prefixed frame."""
    if "type" not in message:
        raise ValueError("message has no 'type'")
    body = json.dumps({"v": PROTOCOL_VERSION, **message}, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME_BYTES:
        raise ValueError(f"message of {len(body)} bytes exceeds the {MAX_FRAME_BYTES}-byte frame cap")
    return _HEADER.pack(len(body)) + body


def decode_body(body: bytes) -> dict[str, Any]:
    """Parse and validate a frame body; raises ProtocolError with a reason on anything odd."""
    try:
        message = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"frame is not UTF-8 JSON: {e}") from None
    if not isinstance(message, dict):
        raise ProtocolError("frame is not a JSON object")
    if message.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {message.get('v')!r}")
    if not isinstance(message.get("type"), str):
        raise ProtocolError("message has no string 'type'")
    return message


class FrameReader:
    """Incremental frame parser for non-blocking sockets (bounded buffering)."""

    def __init__(self, max_frame: int = MAX_FRAME_BYTES) -> None:
        self._buf = bytearray()
        self._max = max_frame

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """Add received bytes; return the complete messages they finish (may raise ProtocolError)."""
        self._buf += data
        out = []
        while len(self._buf) >= _HEADER.size:
            (length,) = _HEADER.unpack_from(self._buf)
            if length > self._max:
                raise ProtocolError(f"frame of {length} bytes exceeds the {self._max}-byte cap")
            if len(self._buf) < _HEADER.size + length:
                break
            body = bytes(self._buf[_HEADER.size : _HEADER.size + length])
            del self._buf[: _HEADER.size + length]
            out.append(decode_body(body))
        return out


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Read exactly n bytes from a blocking socket; raises ConnectionError on EOF."""
    chunks = []
    while n:
        chunk = sock.recv(min(n, 1 << 16))
        if not chunk:
            raise ConnectionError("connection closed by peer")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def recv_frame(sock: socket.socket, max_frame: int = MAX_FRAME_BYTES) -> dict[str, Any]:
    """Read one message from a blocking socket (respecting the size cap)."""
    (length,) = _HEADER.unpack(recv_exact(sock, _HEADER.size))
    if length > max_frame:
        raise ProtocolError(f"frame of {length} bytes exceeds the {max_frame}-byte cap")
    return decode_body(recv_exact(sock, length))


def new_nonce() -> str:
    return os.urandom(16).hex()


def worker_mac(token: str, server_nonce: str, client_nonce: str) -> str:
    return _mac(token, "worker", server_nonce, client_nonce)


def server_mac(token: str, server_nonce: str, client_nonce: str) -> str:
    return _mac(token, "server", client_nonce, server_nonce)


def _mac(token: str, role: str, first: str, second: str) -> str:
    msg = f"lococomm/{PROTOCOL_VERSION}|{role}|{first}|{second}".encode()
    return hmac.new(token.encode(), msg, hashlib.sha256).hexdigest()


def macs_equal(a: Any, b: str) -> bool:
    return isinstance(a, str) and hmac.compare_digest(a.encode(), b.encode())


def is_loopback_host(host: str) -> bool:
    """True if every address `host` resolves to is a loopback address."""
    import ipaddress

    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    addrs = {info[4][0] for info in infos}
    return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)
