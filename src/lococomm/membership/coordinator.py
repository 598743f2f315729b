"""The coordinator server: one process, one event-loop thread, one TCP connection per worker.

It authenticates workers, turns socket events into `QuorumState` events (see quorum.py for the
rules) and carries out the resulting actions. A crash is a closed connection (acted on at once),
a hang is silence longer than `heartbeat_timeout`. It also hosts the torch TCPStore on which
each epoch's process groups rendezvous (key prefix ``lococomm/<epoch>/<group_rank>``).

Anything malformed, oversized, unauthenticated or out of protocol closes only the offending
connection, with a logged reason.
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
import time
from typing import Any

from lococomm.membership import wire
from lococomm.membership.quorum import Close, QuorumState, Send

log = logging.getLogger(__name__)

REGISTER_TIMEOUT = 10.0  # seconds an unauthenticated connection may stay open
MAX_CONNECTIONS = 4096
MAX_OUTBOX_BYTES = 8 << 20  # a reader this far behind is treated as dead


class _Conn:
    def __init__(self, conn_id: int, sock: socket.socket, peer: str, now: float) -> None:
        self.id = conn_id
        self.sock = sock
        self.peer = peer
        self.reader = wire.FrameReader()
        self.outbox = bytearray()
        self.nonce = wire.new_nonce()
        self.registered = False
        self.opened_at = now
        self.closing = False


class Coordinator:
    """Membership/epoch coordinator. Start with `.start()` (background thread) or as a context.

    Args:
        host: address to listen on. Without a token only loopback addresses are allowed.
        port: TCP port (0 picks a free one; see `.address`).
        token: shared secret for the HMAC handshake (falls back to $LOCOCOMM_TOKEN if None).
        heartbeat_timeout: seconds of silence after which a worker counts as hung.
        min_workers: replicas needed before an epoch may form.
        join_timeout: seconds a quorum waits for freshly registered workers.
        quorum_timeout: seconds a quorum waits for members of the last epoch.
        recovery_timeout: after a restart, seconds to wait for the previous members to return.
        initial_workers: replicas the first epoch waits for (default min_workers), at most
            quorum_timeout seconds; later epochs only need min_workers.
        single_job: once every member left after finishing, refuse to start a new job from
            step 0 (`lococomm run` uses this so late workers cannot restart training).
        resume: this coordinator replaces one that ran the job (restarted on the same
            address): its first epoch waits up to recovery_timeout for workers that report a
            previous epoch instead of starting over with whichever fresh worker asks first.
        store_port: port of the hosted TCPStore (0 picks a free one).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        heartbeat_timeout: float = 5.0,
        min_workers: int = 1,
        join_timeout: float = 0.5,
        quorum_timeout: float = 60.0,
        recovery_timeout: float = 5.0,
        store_port: int = 0,
        initial_workers: int | None = None,
        single_job: bool = False,
        resume: bool = False,
    ) -> None:
        if token is None:
            import os

            token = os.environ.get("LOCOCOMM_TOKEN") or None
        if not token and not wire.is_loopback_host(host):
            raise ValueError(
                f"refusing to listen on {host!r} without a token: set --token/LOCOCOMM_TOKEN or "
                "bind to a loopback address"
            )
        self.host = host
        self._requested_port = port
        self.token = token
        self.state = QuorumState(
            heartbeat_timeout=heartbeat_timeout,
            min_workers=min_workers,
            join_timeout=join_timeout,
            quorum_timeout=quorum_timeout,
            recovery_timeout=recovery_timeout,
            initial_workers=initial_workers,
            single_job=single_job,
            resume=resume,
            now=time.monotonic(),
        )
        self._store_port_requested = store_port
        self._lock = threading.Lock()
        self._conns: dict[int, _Conn] = {}
        self._next_conn = 0
        self._listener: socket.socket | None = None
        self._selector: selectors.BaseSelector | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self.store: Any = None
        self.port = 0
        self.store_port = 0
        self.tick_interval = min(0.05, heartbeat_timeout / 10)

    # ------------------------------------------------------------------ lifecycle
    @property
    def address(self) -> str:
        """'host:port' that workers pass as `coordinator=`."""
        if not self.port:
            raise RuntimeError("coordinator is not started")
        return f"{self.host}:{self.port}"

    def start(self) -> Coordinator:
        """Bind, start the TCPStore and the event loop thread; returns self."""
        import torch.distributed as dist

        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self._requested_port))
        listener.listen(256)
        listener.setblocking(False)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self.store = dist.TCPStore(
            self.host, self._store_port_requested, is_master=True, wait_for_workers=False
        )
        self.store_port = self.store.port
        self._selector = selectors.DefaultSelector()
        self._selector.register(listener, selectors.EVENT_READ, None)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(target=self._loop, name="lococomm-coordinator", daemon=True)
        self._thread.start()
        log.info("coordinator listening on %s (store port %d)", self.address, self.store_port)
        return self

    def stop(self) -> None:
        """Close every connection and the listener; the TCPStore goes with the object."""
        if self._thread is None:
            return
        self._stopping.set()
        if self._wake_w is not None:
            try:
                self._wake_w.send(b"x")
            except OSError:
                pass
        self._thread.join(timeout=5)
        self._thread = None
        for conn in list(self._conns.values()):
            try:
                conn.sock.close()
            except OSError:
                pass
        self._conns.clear()
        for s in (self._listener, self._wake_r, self._wake_w):
            if s is not None:
                s.close()
        if self._selector is not None:
            self._selector.close()
        self.store = None

    def serve_forever(self) -> None:
        """Block until `stop()` is called (from a signal handler, for instance)."""
        if self._thread is None:
            self.start()
        while not self._stopping.wait(0.5):
            pass

    def __enter__(self) -> Coordinator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return self.state.snapshot()

    def events(self) -> list[dict[str, Any]]:
        with self._lock:
            return [vars(e).copy() for e in self.state.events]

    def finals(self) -> dict[str, dict[str, Any]]:
        """Final step and state digest each gracefully leaving worker reported."""
        with self._lock:
            return {k: dict(v) for k, v in self.state.finals.items()}

    # ------------------------------------------------------------------ event loop
    def _loop(self) -> None:
        assert self._selector is not None
        while not self._stopping.is_set():
            try:
                ready = self._selector.select(timeout=self.tick_interval)
            except OSError:
                break
            now = time.monotonic()
            for key, mask in ready:
                if key.data is None:
                    self._accept(now)
                elif key.data == "wake":
                    try:
                        self._wake_r.recv(64)  # type: ignore[union-attr]
                    except OSError:
                        pass
                else:
                    conn = self._conns.get(key.data)
                    if conn is None:
                        continue
                    if mask & selectors.EVENT_READ:
                        self._read(conn, now)
                    if mask & selectors.EVENT_WRITE and conn.id in self._conns:
                        self._flush(conn)
            with self._lock:
                actions = self.state.tick(now)
            self._apply(actions)
            for conn in list(self._conns.values()):
                if not conn.registered and now - conn.opened_at > REGISTER_TIMEOUT:
                    self._close(conn, "did not register in time")

    def _accept(self, now: float) -> None:
        assert self._listener is not None and self._selector is not None
        while True:
            try:
                sock, addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("accept failed: %s", e)
                return
            if len(self._conns) >= MAX_CONNECTIONS:
                log.warning("refusing %s: %d connections open", addr, len(self._conns))
                sock.close()
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._next_conn += 1
            conn = _Conn(self._next_conn, sock, f"{addr[0]}:{addr[1]}", now)
            self._conns[conn.id] = conn
            self._selector.register(sock, selectors.EVENT_READ, conn.id)
            self._send(conn, {"type": "hello", "nonce": conn.nonce, "auth": bool(self.token)})

    def _read(self, conn: _Conn, now: float) -> None:
        try:
            data = conn.sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._lost(conn, f"read error: {e}", now)
            return
        if not data:
            self._lost(conn, "connection closed", now)
            return
        try:
            messages = conn.reader.feed(data)
        except wire.ProtocolError as e:
            self._reject(conn, str(e), now)
            return
        for message in messages:
            if conn.id not in self._conns or conn.closing:
                return
            try:
                self._handle(conn, message, now)
            except wire.ProtocolError as e:
                self._reject(conn, str(e), now)
                return

    def _handle(self, conn: _Conn, msg: dict[str, Any], now: float) -> None:
        kind = msg["type"]
        if not conn.registered:
            if kind != "register":
                raise wire.ProtocolError(f"expected 'register' first, got {kind!r}")
            self._register(conn, msg, now)
            return
        with self._lock:
            self.state.touch(conn.id, now)
            if kind == "hb":
                return
            if kind == "quorum":
                actions = self.state.request_quorum(
                    conn.id, _int(msg, "step"), now, synced=_bool(msg, "synced", True)
                )
            elif kind == "vote":
                actions = self.state.vote(
                    conn.id,
                    _int(msg, "epoch"),
                    _int(msg, "step"),
                    _bool(msg, "ok"),
                    _str(msg, "signature", ""),
                    _str_list(msg, "signatures"),
                    _str(msg, "reason", ""),
                    _info(msg),
                    now,
                    digest=_str(msg, "digest", ""),
                    tensor_digests=_str_list(msg, "tensor_digests"),
                )
            elif kind == "leave":
                final = {"step": _int(msg, "step", -1), "digest": _str(msg, "digest", "")}
                actions = self.state.disconnect(
                    conn.id, "left gracefully", now, kind="leave", final=final
                )
                actions.append(Close(conn.id, "left"))
            else:
                raise wire.ProtocolError(f"unknown message type {kind!r}")
        self._apply(actions)

    def _register(self, conn: _Conn, msg: dict[str, Any], now: float) -> None:
        client_nonce = _str(msg, "client_nonce")
        if self.token and not wire.macs_equal(
            msg.get("mac"), wire.worker_mac(self.token, conn.nonce, client_nonce)
        ):
            self._send(conn, {"type": "error", "reason": "authentication failed"})
            self._close(conn, "authentication failed (bad or missing token)")
            return
        replica_id = _str(msg, "replica_id")
        if not replica_id or len(replica_id) > 256:
            raise wire.ProtocolError("replica_id must be a non-empty string of <= 256 characters")
        group_rank = _int(msg, "group_rank")
        group_world_size = _int(msg, "group_world_size")
        if not 1 <= group_world_size <= 65536:
            raise wire.ProtocolError(f"group_world_size {group_world_size} out of range")
        host = _str(msg, "host", "")
        if len(host) > 255:
            raise wire.ProtocolError("host must be a string of <= 255 characters")
        conn.registered = True
        with self._lock:
            actions = self.state.register(
                conn.id,
                replica_id,
                group_rank,
                group_world_size,
                _int(msg, "step", 0),
                _int(msg, "last_epoch", 0),
                _str_list(msg, "last_members"),
                now,
                host,
            )
        for action in actions:
            if isinstance(action, Send) and action.message["type"] == "welcome":
                action.message["store_port"] = self.store_port
                if self.token:
                    action.message["mac"] = wire.server_mac(self.token, conn.nonce, client_nonce)
        self._apply(actions)

    # ------------------------------------------------------------------ actions & io
    def _apply(self, actions: list[Any]) -> None:
        for action in actions:
            conn = self._conns.get(action.conn)
            if conn is None:
                continue
            if isinstance(action, Send):
                self._send(conn, action.message)
            else:
                self._close(conn, action.reason)

    def _send(self, conn: _Conn, message: dict[str, Any]) -> None:
        conn.outbox += wire.encode_frame(message)
        if len(conn.outbox) > MAX_OUTBOX_BYTES:
            self._lost(conn, "not reading its messages", time.monotonic())
            return
        self._flush(conn)

    def _flush(self, conn: _Conn) -> None:
        assert self._selector is not None
        try:
            while conn.outbox:
                sent = conn.sock.send(conn.outbox)
                del conn.outbox[:sent]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as e:
            self._lost(conn, f"write error: {e}", time.monotonic())
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.outbox else 0)
        try:
            self._selector.modify(conn.sock, events, conn.id)
        except (KeyError, ValueError):
            pass

    def _reject(self, conn: _Conn, reason: str, now: float) -> None:
        log.warning("closing connection from %s: %s", conn.peer, reason)
        try:
            conn.sock.send(wire.encode_frame({"type": "error", "reason": reason[:500]}))
        except OSError:
            pass
        self._lost(conn, f"protocol violation: {reason}", now)

    def _lost(self, conn: _Conn, reason: str, now: float) -> None:
        """The connection is unusable: drop it and tell the state machine (a crash)."""
        self._close(conn, reason)
        with self._lock:
            actions = self.state.disconnect(conn.id, reason, now)
        self._apply(actions)

    def _close(self, conn: _Conn, reason: str) -> None:
        if self._conns.pop(conn.id, None) is None:
            return
        if conn.outbox:
            try:
                conn.sock.send(conn.outbox)
            except OSError:
                pass
        if self._selector is not None:
            try:
                self._selector.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
        try:
            conn.sock.close()
        except OSError:
            pass
        log.debug("closed connection %s: %s", conn.peer, reason)


def _int(msg: dict[str, Any], name: str, default: int | None = None) -> int:
    value = msg.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise wire.ProtocolError(f"field {name!r} must be an integer")
    return value


def _bool(msg: dict[str, Any], name: str, default: bool | None = None) -> bool:
    value = msg.get(name, default)
    if not isinstance(value, bool):
        raise wire.ProtocolError(f"field {name!r} must be a boolean")
    return value


def _str(msg: dict[str, Any], name: str, default: str | None = None) -> str:
    value = msg.get(name, default)
    if not isinstance(value, str):
        raise wire.ProtocolError(f"field {name!r} must be a string")
    return value


def _str_list(msg: dict[str, Any], name: str) -> list[str]:
    value = msg.get(name, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise wire.ProtocolError(f"field {name!r} must be a list of strings")
    return value


def _info(msg: dict[str, Any]) -> dict[str, Any]:
    value = msg.get("info", {})
    if not isinstance(value, dict) or len(value) > 32:
        raise wire.ProtocolError("field 'info' must be an object of at most 32 entries")
    return {
        str(k)[:64]: v for k, v in value.items() if isinstance(v, int | float | str | bool)
    }
