"""Healing's TCP links (ft/heal_links.py): rendezvous through a store, in one process.

Sources and receivers run on threads over an in-process HashStore. Every receiver must end up
with one connection per source the primary names (and only those), a stray connection must be
refused without disturbing the rendezvous, and an abort must end every wait.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import torch.distributed as dist

from lococomm.collectives.abort import AbortSignal
from lococomm.collectives.ring_sockets import RendezvousError
from lococomm.ft.heal_links import HELLO, MAGIC, connect_heal_links
from lococomm.ft.healing import stream_sources


def _rendezvous(store, ranks, sources, receivers, abort, timeout=20.0):
    links: dict[int, dict] = {}
    errors: dict[int, str] = {}

    def member(rank: int) -> None:
        try:
            links[rank] = connect_heal_links(store, rank, sources, receivers, "127.0.0.1", abort, timeout)
        except RendezvousError as e:
            errors[rank] = str(e)

    threads = [threading.Thread(target=member, args=(r,), daemon=True) for r in ranks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive(), "heal link rendezvous hung"
    return links, errors


def _close(links):
    for peers in links.values():
        for sock in peers.values():
            sock.close()


@pytest.mark.timeout(60)
def test_every_receiver_links_to_every_named_source_and_bytes_flow():
    store = dist.HashStore()
    store.set("heal/sources", json.dumps([0, 2]))
    links, errors = _rendezvous(store, [0, 1, 2, 3, 4], sources=[0, 1, 2], receivers=[3, 4], abort=AbortSignal())
    assert errors == {}
    assert set(links[0]) == {3, 4} and set(links[2]) == {3, 4}
    assert links[1] == {}  # up to date, but not named: takes no part
    assert set(links[3]) == {0, 2} and set(links[4]) == {0, 2}
    for source in (0, 2):
        for receiver in (3, 4):
            out, into = links[source][receiver], links[receiver][source]
            assert not out.getblocking() and not into.getblocking()
            out.send(f"{source}->{receiver}".encode())
            deadline = time.monotonic() + 5
            while True:
                try:
                    got = into.recv(64)
                    break
                except BlockingIOError:
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
            assert got == f"{source}->{receiver}".encode()
    _close(links)


@pytest.mark.timeout(60)
def test_a_stray_connection_is_refused_and_the_rendezvous_goes_on():
    store = dist.HashStore()
    store.set("heal/sources", json.dumps([0]))
    abort = AbortSignal()
    result: dict = {}
    source = threading.Thread(
        target=lambda: result.setdefault(0, connect_heal_links(store, 0, [0], [1], "127.0.0.1", abort, 20.0)),
        daemon=True,
    )
    source.start()
    while not store.check(["heal/links/0"]):
        time.sleep(0.01)
    address, _, nonce = store.get("heal/links/0").decode().partition("/")
    host, port = address.rsplit(":", 1)
    # wrong nonce, then an unexpected rank with the right nonce, then silence
    for rank, presented in ((1, b"\0" * 16), (7, bytes.fromhex(nonce))):
        with socket.create_connection((host, int(port))) as stray:
            stray.sendall(HELLO.pack(MAGIC, rank, presented))
            stray.settimeout(5)
            assert stray.recv(1) == b""  # closed by the source
    mine = connect_heal_links(store, 1, [0], [1], "127.0.0.1", abort, 20.0)
    source.join(30)
    assert set(result[0]) == {1} and set(mine) == {0}
    _close({0: result[0], 1: mine})


@pytest.mark.timeout(60)
def test_an_abort_ends_the_waits():
    store = dist.HashStore()
    abort = AbortSignal()
    threading.Timer(0.3, abort.abort, ("epoch given up",)).start()
    started = time.monotonic()
    # nobody ever names the sources
    _, errors = _rendezvous(store, [0, 1], sources=[0], receivers=[1], abort=abort)
    assert time.monotonic() - started < 10
    assert set(errors) == {0, 1} and all("aborted" in e for e in errors.values()), errors
    # a source whose receiver never comes
    store.set("heal/sources", json.dumps([0]))
    abort = AbortSignal()
    threading.Timer(0.3, abort.abort, ("epoch given up",)).start()
    _, errors = _rendezvous(store, [0], sources=[0], receivers=[1], abort=abort)
    assert "aborted" in errors[0], errors


def test_named_sources_outside_the_plan_are_refused():
    store = dist.HashStore()
    store.set("heal/sources", json.dumps([5]))
    with pytest.raises(RendezvousError, match="names sources"):
        connect_heal_links(store, 1, [0], [1], "127.0.0.1", AbortSignal(), 5.0)
    with pytest.raises(ValueError, match="neither a source"):
        connect_heal_links(store, 9, [0], [1], "127.0.0.1", AbortSignal(), 5.0)


def test_stream_sources_spread_large_states_only_and_over_hosts():
    mib = 1 << 20
    assert stream_sources([2, 0, 1], 10 * mib) == [0]
    assert stream_sources([2, 0, 1], 64 * mib) == [0]
    assert stream_sources([2, 0, 1], 65 * mib) == [0, 1]
    assert stream_sources([2, 0, 1], 10_000 * mib) == [0, 1, 2]
    assert stream_sources([3], 0) == [3]
    # one source per host: same-host sources share its cores and NIC
    one_host = {0: "10.0.0.1", 1: "10.0.0.1", 2: "10.0.0.1"}
    assert stream_sources([2, 0, 1], 10_000 * mib, one_host) == [0]
    two_hosts = {0: "10.0.0.1", 1: "10.0.0.1", 2: "10.0.0.2", 3: "10.0.0.2", 4: "10.0.0.3"}
    assert stream_sources([4, 3, 2, 1, 0], 10_000 * mib, two_hosts) == [0, 2, 4]
    assert stream_sources([4, 3, 2, 1, 0], 100 * mib, two_hosts) == [0, 2]
    assert stream_sources([4, 3, 2, 1, 0], 10 * mib, two_hosts) == [0]
    # a source that did not say where it is counts as a host of its own
    assert stream_sources([0, 1, 2], 10_000 * mib, {0: "a", 1: "", 2: "a"}) == [0, 1]
