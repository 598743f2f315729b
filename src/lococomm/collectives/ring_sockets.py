"""The exact ring's own TCP connections: one to each ring neighbour, once per epoch.

The native ring (`csrc/ring.cpp`) streams its hops over plain TCP sockets rather than gloo
pair groups, because gloo's transport is not reachable from Python except through its own
collectives, and a hop driven from Python over them costs thread hand-offs (see
`exact_ring.py`). Rendezvous goes through the epoch's store, like every group of the epoch:

1. every member listens on an ephemeral port of the address its gloo groups use and publishes
   ``host:port`` and a random 16-byte nonce under ``<prefix>/addr/<rank>``;
2. it connects to its right neighbour and sends a 32-byte hello (magic, its rank, the right
   neighbour's nonce), then accepts from its left neighbour and checks the hello: a connection
   that does not present this epoch's nonce and the expected rank is closed and ignored.

The store is the trust root here, as it is for gloo. Reads are bounded (a hello is exactly 32
bytes, read with a deadline); an abort or the deadline stops every wait.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import struct
import threading
import time
import weakref
from dataclasses import dataclass

from lococomm.collectives.abort import AbortSignal, wait_store_keys

log = logging.getLogger(__name__)

_MAGIC = b"LCRING02"  # bump whenever the ring's schedule or stream format changes
HELLO = struct.Struct("!8sQ16s")  # magic, sender rank, receiver's nonce: 32 bytes
_SLICE_SECONDS = 0.05  # longest an abort can go unnoticed during the rendezvous
HELLO_SECONDS = 2.0  # a connected peer's hello is 32 bytes: it comes at once or never


class RendezvousError(RuntimeError):
    """The ring's sockets could not be connected (abort, deadline, bad peer)."""


@dataclass
class RingSockets:
    """This member's two ring connections: `right` (it sends), `left` (it receives)."""

    right: socket.socket
    left: socket.socket

    def close(self) -> None:
        close_quietly(self.right)
        close_quietly(self.left)


def close_quietly(sock: socket.socket) -> None:
    """Shut down and close a connection, ignoring errors. Shutdown first: a forked child (a
    DataLoader worker) may hold a copy of the fd, and close() alone would then send no FIN."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


def split_host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def tune(sock: socket.socket) -> None:
    """No Nagle delay, non-blocking: how the native executors use their sockets."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)


def wait_readable(sock: socket.socket, abort: AbortSignal, deadline: float, what: str) -> None:
    while True:
        if abort.aborted:
            raise RendezvousError(f"{what}: aborted: {abort.reason}")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RendezvousError(f"{what}: timed out")
        poller = select.poll()  # not select.select: it refuses fds >= 1024
        poller.register(sock.fileno(), select.POLLIN)
        if poller.poll(min(remaining, _SLICE_SECONDS) * 1e3):
            return


def read_exact(
    sock: socket.socket, size: int, abort: AbortSignal, deadline: float, what: str = "ring hello"
) -> bytes:
    """Exactly `size` bytes from a blocking socket (a hello: bounded, with a deadline)."""
    data = b""
    while len(data) < size:
        wait_readable(sock, abort, deadline, what)
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise RendezvousError(f"{what}: connection closed")
        data += chunk
    return data


def set_buffers(sock: socket.socket, nbytes: int) -> None:
    """Send and receive buffers of `nbytes` (the kernel caps them at rmem_max/wmem_max). Set
    before connect/listen, so the window scale allows them; accepted sockets inherit them."""
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        sock.setsockopt(socket.SOL_SOCKET, option, nbytes)


def accept_hello(
    listener: socket.socket, abort: AbortSignal, deadline: float, what: str
) -> tuple[socket.socket, object, bytes, int, bytes] | None:
    """Accept one connection on `listener` and read its 32-byte hello: (connection, peer
    address, magic, sender rank, nonce), or None if the connection was dropped (logged): a stray connection
    that sends nothing gets HELLO_SECONDS, so it cannot hold the accept loop. Raises
    RendezvousError on abort or the deadline while waiting for a connection."""
    wait_readable(listener, abort, deadline, f"accepting {what}")
    conn, peer = listener.accept()
    try:
        conn.setblocking(True)
        hello_deadline = min(deadline, time.monotonic() + HELLO_SECONDS)
        magic, sender, presented = HELLO.unpack(read_exact(conn, HELLO.size, abort, hello_deadline, f"{what} hello"))
    except (OSError, RendezvousError, struct.error) as e:
        log.warning("%s: dropped a connection from %s: %s", what, peer, e)
        conn.close()
        return None
    return conn, peer, magic, sender, presented


def connect_with_abort(
    address: tuple[str, int],
    abort: AbortSignal,
    deadline: float,
    what: str = "the ring",
    buffer_bytes: int = 0,
) -> socket.socket:
    """A blocking TCP connection to `address`, attempted in slices so an abort is seen while
    an unreachable host swallows the SYNs. `buffer_bytes` > 0 sets its send and receive
    buffers before connecting (so the window scale allows them)."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    while True:
        if abort.aborted:
            raise RendezvousError(f"connecting {what}: aborted: {abort.reason}")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RendezvousError(f"connecting {what} to {address}: timed out")
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            if buffer_bytes > 0:
                set_buffers(sock, buffer_bytes)
            sock.settimeout(min(remaining, 4 * _SLICE_SECONDS))
            sock.connect(address)
            sock.settimeout(None)
            return sock
        except TimeoutError:
            sock.close()
            continue
        except BaseException:
            sock.close()
            raise


def connect_ring(
    store: object, rank: int, world: int, host: str, abort: AbortSignal, timeout: float
) -> RingSockets:
    """Connect this member to its ring neighbours under `store` (a PrefixStore of the epoch).

    Blocking, but every wait in it watches `abort` (slices of 50 ms at most); raises
    RendezvousError on abort, timeout or a broken connection. `host` is the address to listen on and announce (the one the epoch's
    gloo groups use)."""
    if world < 2:
        raise ValueError(f"a ring needs at least 2 members, got {world}")
    deadline = time.monotonic() + timeout
    right_rank, left_rank = (rank + 1) % world, (rank - 1) % world
    nonce = os.urandom(16)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    right: socket.socket | None = None
    try:
        listener.bind((host, 0))
        listener.listen(4)
        port = listener.getsockname()[1]
        store.set(f"addr/{rank}", f"{host}:{port}/{nonce.hex()}")  # type: ignore[attr-defined]
        key = f"addr/{right_rank}"
        err = wait_store_keys(store, [key], abort, deadline)
        if err is not None:
            raise RendezvousError(f"ring rendezvous: {err}")
        announced = store.get(key).decode()  # type: ignore[attr-defined]
        address, _, their_nonce = announced.partition("/")
        right_host, right_port = split_host_port(address)
        right = connect_with_abort((right_host, right_port), abort, deadline)
        right.sendall(HELLO.pack(_MAGIC, rank, bytes.fromhex(their_nonce)))
        while True:
            hello = accept_hello(listener, abort, deadline, f"ring link from rank {left_rank}")
            if hello is None:
                continue
            conn, peer, magic, sender, presented = hello
            if magic != _MAGIC or sender != left_rank or presented != nonce:
                log.warning("ring link: refused a connection from %s (not this epoch's rank %d)", peer, left_rank)
                conn.close()
                continue
            break
        sockets = RingSockets(right=right, left=conn)
        right = None
        try:
            tune(sockets.right)
            tune(sockets.left)
        except OSError:
            sockets.close()
            raise
        return sockets
    except OSError as e:
        raise RendezvousError(f"ring link: {e}") from e
    finally:
        listener.close()
        if right is not None:
            right.close()


_SOCKETS: dict[int, RingSockets | None] = {}  # None: dropped after a failure
_LOCK = threading.Lock()


def remember(owner: object, sockets: RingSockets) -> None:
    """Keep `sockets` for as long as `owner` (the epoch's communicator) lives."""
    key = id(owner)
    with _LOCK:
        _SOCKETS[key] = sockets
    weakref.finalize(owner, _forget, key)


def known(owner: object) -> RingSockets | None:
    with _LOCK:
        return _SOCKETS.get(id(owner))


def broken(owner: object) -> bool:
    """True once `owner`'s sockets were dropped: its rendezvous keys are spent, so the ring
    cannot be reconnected in this epoch (the failed step re-forms the group anyway)."""
    with _LOCK:
        key = id(owner)
        return key in _SOCKETS and _SOCKETS[key] is None


def drop(owner: object) -> None:
    """Close `owner`'s sockets (after a failed ring their streams are out of step) and mark
    the epoch's ring broken."""
    with _LOCK:
        key = id(owner)
        sockets = _SOCKETS.get(key)
        if key not in _SOCKETS:
            weakref.finalize(owner, _forget, key)
        _SOCKETS[key] = None
    if sockets is not None:
        sockets.close()


def _forget(key: int) -> None:
    with _LOCK:
        sockets = _SOCKETS.pop(key, None)
    if sockets is not None:
        sockets.close()
