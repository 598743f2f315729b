"""Worker side of the coordinator connection: handshake, heartbeats, reconnection.

One background thread owns reading: it heartbeats every `heartbeat_timeout / 4` seconds (the
timeout comes from the coordinator's welcome, so any coordinator setting works) and hands every
incoming message to `on_message`. When the connection drops (coordinator crash or restart, or we
were expelled after a hang) it reconnects with backoff for up to `reconnect_timeout` seconds and
re-registers as a *new* worker; `on_connection_change` tells the owner, who must treat its epoch
as over. Sends come from any thread under a lock.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from lococomm.membership import wire

log = logging.getLogger(__name__)


class CoordinatorUnavailable(ConnectionError):
    """The coordinator could not be reached (or refused us) within the allowed time."""


class AuthenticationError(CoordinatorUnavailable):
    """The coordinator rejected our token, or could not prove it knows the token."""


def parse_address(address: str) -> tuple[str, int]:
    if not isinstance(address, str) or ":" not in address:
        raise ValueError(f"coordinator address must be 'host:port', got {address!r}")
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        port_number = int(port)
    except ValueError:
        raise ValueError(f"coordinator address {address!r} has a non-numeric port") from None
    if not 0 < port_number < 65536:
        raise ValueError(f"coordinator address {address!r} has port out of range")
    return host, port_number


class CoordinatorClient:
    """A worker's persistent connection to the coordinator."""

    def __init__(
        self,
        address: str,
        replica_id: str,
        group_rank: int,
        group_world_size: int,
        token: str | None,
        registration: Callable[[str], dict[str, Any]],
        on_message: Callable[[dict[str, Any]], None],
        on_connection_change: Callable[[str], None],
        connect_timeout: float = 60.0,
        reconnect_timeout: float = 120.0,
        heartbeat_interval: float | None = None,
    ) -> None:
        if heartbeat_interval is not None and heartbeat_interval <= 0:
            raise ValueError(f"heartbeat_interval must be > 0 seconds, got {heartbeat_interval}")
        self.host, self.port = parse_address(address)
        self.replica_id = replica_id
        self.group_rank = group_rank
        self.group_world_size = group_world_size
        self.token = token
        self._registration = registration
        self._on_message = on_message
        self._on_change = on_connection_change
        self.connect_timeout = connect_timeout
        self.reconnect_timeout = reconnect_timeout
        self.heartbeat_interval_override = heartbeat_interval
        self._sock: socket.socket | None = None
        self._send_lock = threading.Lock()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self.heartbeat_timeout = 5.0
        self.store_port = 0
        self.incarnation = 0
        self.generation = 0  # +1 per successful registration
        self.local_address = "127.0.0.1"
        self.failure: str | None = None  # set when reconnection gave up

    # ------------------------------------------------------------------ public
    def connect(self) -> None:
        """Connect and register (retrying up to connect_timeout); starts the reader thread."""
        self._connect_with_retry(self.connect_timeout)
        self._thread = threading.Thread(target=self._run, name="lococomm-client", daemon=True)
        self._thread.start()

    def send(self, message: dict[str, Any]) -> bool:
        """Send one message; False if not connected (the reader thread is reconnecting)."""
        frame = wire.encode_frame(message)
        with self._send_lock:
            sock = self._sock
            if sock is None:
                return False
            try:
                sock.sendall(frame)
                return True
            except OSError as e:
                log.warning("send to coordinator failed: %s", e)
                self._drop(sock)
                return False

    def close(self, leave: bool = True, final: dict[str, Any] | None = None) -> None:
        """Stop the thread; with `leave`, tell the coordinator this is a graceful departure
        (with this worker's final step/digest in `final`)."""
        if self._closed.is_set():
            return
        if leave:
            self.send({"type": "leave", **(final or {})})
        self._closed.set()
        with self._send_lock:
            sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    @property
    def connected(self) -> bool:
        return self._sock is not None

    # ------------------------------------------------------------------ internals
    def _handshake(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=5.0)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            hello = wire.recv_frame(sock)
            if hello["type"] != "hello" or not isinstance(hello.get("nonce"), str):
                raise wire.ProtocolError(f"expected hello, got {hello['type']!r}")
            if hello.get("auth") and not self.token:
                raise AuthenticationError(
                    "coordinator requires a token: pass token= or set LOCOCOMM_TOKEN"
                )
            client_nonce = wire.new_nonce()
            message: dict[str, Any] = {
                "type": "register",
                "replica_id": self.replica_id,
                "group_rank": self.group_rank,
                "group_world_size": self.group_world_size,
                "client_nonce": client_nonce,
                # (the address this connection leaves from: a worker reports the host its
                # peers reach it at, e.g. for heals spread over sources on distinct hosts)
                **self._registration(sock.getsockname()[0]),
            }
            if self.token:
                message["mac"] = wire.worker_mac(self.token, hello["nonce"], client_nonce)
            sock.sendall(wire.encode_frame(message))
            welcome = wire.recv_frame(sock)
            if welcome["type"] == "error":
                reason = str(welcome.get("reason"))
                if "authentication" in reason:
                    raise AuthenticationError(f"coordinator refused us: {reason}")
                raise CoordinatorUnavailable(f"coordinator refused us: {reason}")
            if welcome["type"] != "welcome":
                raise wire.ProtocolError(f"expected welcome, got {welcome['type']!r}")
            if self.token and not wire.macs_equal(
                welcome.get("mac"), wire.server_mac(self.token, hello["nonce"], client_nonce)
            ):
                raise AuthenticationError("coordinator could not prove it knows the token")
            self.heartbeat_timeout = float(welcome["heartbeat_timeout"])
            self.store_port = int(welcome["store_port"])
            self.incarnation = int(welcome["incarnation"])
            self.local_address = sock.getsockname()[0]
            interval = self.heartbeat_interval_override
            if interval is not None and interval >= self.heartbeat_timeout / 2:
                log.warning(
                    "heartbeat_interval %.2fs is not well below the coordinator's %.2fs timeout",
                    interval,
                    self.heartbeat_timeout,
                )
            sock.settimeout(self._heartbeat_interval())
            return sock
        except BaseException:
            sock.close()
            raise

    def _heartbeat_interval(self) -> float:
        if self.heartbeat_interval_override is not None:
            return self.heartbeat_interval_override
        return max(0.02, self.heartbeat_timeout / 4)

    def _connect_with_retry(self, budget: float) -> None:
        deadline = time.monotonic() + budget
        delay = 0.05
        attempts = 0
        last_error: Exception | None = None
        while not self._closed.is_set():
            attempts += 1
            try:
                sock = self._handshake()
            except AuthenticationError:
                raise
            except (OSError, wire.ProtocolError, CoordinatorUnavailable, KeyError, ValueError) as e:
                last_error = e
                if time.monotonic() + delay > deadline:
                    raise CoordinatorUnavailable(
                        f"coordinator {self.host}:{self.port} unreachable for {budget:.0f}s "
                        f"({attempts} attempts): {e}"
                    ) from e
                if attempts in (1, 10) or attempts % 50 == 0:
                    log.warning(
                        "coordinator %s:%d not reachable (%s); retrying for up to %.0fs",
                        self.host,
                        self.port,
                        e,
                        deadline - time.monotonic(),
                    )
                time.sleep(delay)
                delay = min(delay * 1.5, 1.0)
                continue
            with self._send_lock:
                self._sock = sock
            self.generation += 1
            if self.generation > 1:
                log.warning(
                    "reconnected to coordinator as a new worker (incarnation %d)", self.incarnation
                )
            return
        raise CoordinatorUnavailable(f"client closed while connecting ({last_error})")

    def _drop(self, sock: socket.socket) -> None:
        """Forget a broken socket (caller holds the send lock or owns the socket)."""
        if self._sock is sock:
            self._sock = None
        try:
            sock.close()
        except OSError:
            pass

    def _run(self) -> None:
        reader = wire.FrameReader()
        next_heartbeat = time.monotonic()
        while not self._closed.is_set():
            sock = self._sock
            if sock is None:
                reason = "lost connection to coordinator"
                self._on_change(reason)
                try:
                    self._connect_with_retry(self.reconnect_timeout)
                except CoordinatorUnavailable as e:
                    if not self._closed.is_set():
                        self.failure = str(e)
                        log.error("giving up on coordinator: %s", e)
                        self._on_change(f"coordinator unavailable: {e}")
                    return
                reader = wire.FrameReader()
                self._on_change("reconnected")
                next_heartbeat = time.monotonic()
                continue
            now = time.monotonic()
            if now >= next_heartbeat:
                self.send({"type": "hb"})
                next_heartbeat = now + self._heartbeat_interval()
            try:
                data = sock.recv(1 << 16)
            except TimeoutError:
                continue
            except OSError as e:
                if not self._closed.is_set():
                    log.warning("coordinator connection error: %s", e)
                with self._send_lock:
                    self._drop(sock)
                continue
            if not data:
                if not self._closed.is_set():
                    log.warning("coordinator closed the connection")
                with self._send_lock:
                    self._drop(sock)
                continue
            try:
                messages = reader.feed(data)
            except wire.ProtocolError as e:
                log.error("bad frame from coordinator (%s); reconnecting", e)
                with self._send_lock:
                    self._drop(sock)
                continue
            for message in messages:
                if message["type"] == "expelled":
                    log.warning("expelled by the coordinator: %s", message.get("reason"))
                elif message["type"] == "error":
                    log.error("coordinator error: %s", message.get("reason"))
                self._on_message(message)
