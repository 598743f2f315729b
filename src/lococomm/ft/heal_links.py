"""Healing's TCP connections: one from each receiver to each source, once per heal.

The state streams (`ops.heal_stream`, csrc/heal_stream.cpp) run over plain TCP rather than
gloo broadcasts: one native call moves every chunk of every source with its checksum inline,
where the broadcasts cost a collective and a Python wait per chunk, a round trip through the
store for the checksums, and a staging copy for module parameters (an abandoned gloo receive
may still write later; a returned native call does not). Rendezvous through the heal's store
prefix, like every group of the epoch:

0. every member waits for ``heal/sources``, the sources the primary source streams from (a
   small state comes from fewer than all up-to-date members: `healing.stream_sources`);
1. every such source listens on an ephemeral port of the address its gloo groups use and publishes
   ``host:port`` and a random 16-byte nonce under ``heal/links/<rank>``;
2. every receiver connects to every source (in rank order) and sends a 32-byte hello (magic,
   its rank, the source's nonce); a source accepts until it holds one connection per receiver
   and drops any that does not present its nonce and an expected, not yet seen rank.

Reads are bounded (a hello is exactly 32 bytes, read with a deadline); an abort or the
deadline stops every wait.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time

from lococomm.collectives.abort import AbortSignal, wait_store_keys
from lococomm.collectives.ring_sockets import (
    HELLO,
    RendezvousError,
    accept_hello,
    close_quietly,
    connect_with_abort,
    set_buffers,
    split_host_port,
    tune,
)

log = logging.getLogger(__name__)

MAGIC = b"LCHEAL01"  # bump whenever the heal stream format changes
# Socket buffers of a heal link, bytes: a fresh connection's autotuned buffers start at
# 128 KiB and grow over the first megabytes, which a 10 MB heal notices (3.3 -> 2.7 ms on
# loopback, measured).
BUFFER_BYTES = 4 << 20


def connect_heal_links(
    store: object,
    rank: int,
    sources: list[int],
    receivers: list[int],
    host: str,
    abort: AbortSignal,
    timeout: float,
) -> dict[int, socket.socket]:
    """This member's heal connections under `store` (the heal's PrefixStore of the epoch):
    a source gets {receiver rank: socket}, a receiver {source rank: socket}, connected,
    non-blocking, TCP_NODELAY. Blocking, but every wait watches `abort`; raises
    RendezvousError on abort, timeout or a broken connection."""
    if rank not in sources and rank not in receivers:
        raise ValueError(f"rank {rank} is neither a source {sources} nor a receiver {receivers}")
    deadline = time.monotonic() + timeout
    # The primary source names the sources it streams from (`healing.stream_sources`: a
    # small state comes from fewer of them); a source it does not name takes no part.
    err = wait_store_keys(store, ["heal/sources"], abort, deadline)
    if err is not None:
        raise RendezvousError(f"heal link rendezvous: {err}")
    used = json.loads(store.get("heal/sources"))  # type: ignore[attr-defined]
    if not isinstance(used, list) or not set(used) <= set(sources):
        raise RendezvousError(f"heal link rendezvous: the primary source names sources {used}, the plan {sources}")
    if rank in used:
        return _accept_receivers(store, rank, sorted(receivers), host, abort, deadline)
    if rank in receivers:
        return _connect_sources(store, rank, sorted(used), abort, deadline)
    return {}


def _accept_receivers(
    store: object, rank: int, receivers: list[int], host: str, abort: AbortSignal, deadline: float
) -> dict[int, socket.socket]:
    nonce = os.urandom(16)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    set_buffers(listener, BUFFER_BYTES)  # accepted connections inherit them
    links: dict[int, socket.socket] = {}
    try:
        listener.bind((host, 0))
        listener.listen(max(4, len(receivers)))
        port = listener.getsockname()[1]
        store.set(f"heal/links/{rank}", f"{host}:{port}/{nonce.hex()}")  # type: ignore[attr-defined]
        while len(links) < len(receivers):
            hello = accept_hello(listener, abort, deadline, "heal link")
            if hello is None:
                continue
            conn, peer, magic, sender, presented = hello
            if magic != MAGIC or presented != nonce or sender not in receivers or sender in links:
                log.warning("heal link: refused a connection from %s (not a receiver of this heal)", peer)
                conn.close()
                continue
            try:
                tune(conn)
            except OSError:
                conn.close()
                raise
            links[sender] = conn
        done, links = links, {}
        return done
    except OSError as e:
        raise RendezvousError(f"heal link: {e}") from e
    finally:
        listener.close()
        for conn in links.values():  # only if we failed
            close_quietly(conn)


def _connect_sources(
    store: object, rank: int, sources: list[int], abort: AbortSignal, deadline: float
) -> dict[int, socket.socket]:
    keys = [f"heal/links/{s}" for s in sources]
    err = wait_store_keys(store, keys, abort, deadline)
    if err is not None:
        raise RendezvousError(f"heal link rendezvous: {err}")
    links: dict[int, socket.socket] = {}
    try:
        for source, announced in zip(sources, store.multi_get(keys)):  # type: ignore[attr-defined]
            address, _, their_nonce = announced.decode().partition("/")
            conn = connect_with_abort(
                split_host_port(address), abort, deadline, f"the heal link to rank {source}", BUFFER_BYTES
            )
            links[source] = conn
            conn.sendall(HELLO.pack(MAGIC, rank, bytes.fromhex(their_nonce)))
            tune(conn)
        done, links = links, {}
        return done
    except OSError as e:
        raise RendezvousError(f"heal link: {e}") from e
    finally:
        for conn in links.values():  # only if we failed
            close_quietly(conn)
