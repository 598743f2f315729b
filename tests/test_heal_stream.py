"""Healing's stream executor (`ops.heal_stream`: csrc/heal_stream.cpp and its Python reference)
in one process: senders and receivers on threads, linked by loopback TCP connections.

Every byte must land where the plan says (pieces of odd sizes, packed and split chunks, several
streams at once); the C++ executor and the reference put the same bytes on the wire, so either
can talk to the other. Corrupted chunks, a wrong header, a peer that goes away, an abort and the
deadline must each end the call at once with the reason, never hang.
"""

from __future__ import annotations

import os
import socket
import threading

import pytest
import torch

from lococomm import ops
from lococomm.ops import _build

HAVE_CPP = _build.get("cpu") is not None
IMPLS = ["torch", "cpp"] if HAVE_CPP else ["torch"]


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    """(sender end, receiver end) of one loopback TCP connection, non-blocking."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    for s in (a, b):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
    return a, b


def _plan(sizes: list[list[int]], seed: int) -> tuple[list[torch.Tensor], list[int]]:
    """Pieces of random bytes, one chunk per inner list of piece sizes."""
    g = torch.Generator().manual_seed(seed)
    pieces, ends = [], []
    for chunk in sizes:
        for n in chunk:
            pieces.append(torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g))
        ends.append(len(pieces))
    return pieces, ends


def _header(tag: int) -> torch.Tensor:
    return torch.tensor([0x4C43, tag, 7, 11], dtype=torch.int64).view(torch.uint8)


def _run(fn, *args) -> threading.Thread:
    t = threading.Thread(target=fn, args=args, daemon=True)
    t.start()
    return t


def _join(*threads: threading.Thread) -> None:
    for t in threads:
        t.join(60)
        assert not t.is_alive(), "heal stream executor hung"


# Chunks of odd sizes: empty pieces, pieces shorter than a word, a chunk of one big piece, a
# packed chunk of many small ones (more than the executor's 64 iovecs per call), an empty chunk.
SIZES = [[1, 0, 3, 7], [1 << 20], [5] * 100 + [13], [], [4096 + 5, 8, 16], [0]]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("send_impl", IMPLS)
@pytest.mark.parametrize("recv_impl", IMPLS)
def test_two_sources_to_two_receivers_land_every_byte(send_impl, recv_impl):
    # two sources, each streaming its own chunks to both receivers (as a heal does)
    plans = [_plan(SIZES, seed) for seed in (1, 2)]
    links = [[_tcp_pair() for _ in range(2)] for _ in range(2)]  # links[source][receiver]
    landed = [[[torch.zeros_like(p) for p in plans[s][0]] for s in range(2)] for _ in range(2)]
    errors: dict[str, str] = {}
    abort_r, abort_w = os.pipe()

    def source(s: int) -> None:
        pieces, ends = plans[s]
        errors[f"s{s}"] = ops.heal_stream(
            [links[s][r][0].fileno() for r in range(2)], [pieces, pieces], [ends, ends],
            [_header(s), _header(s)], True, abort_r, 30.0, impl=send_impl,
        )  # fmt: skip

    def receiver(r: int) -> None:
        errors[f"r{r}"] = ops.heal_stream(
            [links[s][r][1].fileno() for s in range(2)], landed[r], [plans[s][1] for s in range(2)],
            [_header(s) for s in range(2)], False, abort_r, 30.0, impl=recv_impl,
        )  # fmt: skip

    _join(*[_run(source, s) for s in range(2)], *[_run(receiver, r) for r in range(2)])
    assert errors == {"s0": "", "s1": "", "r0": "", "r1": ""}
    for r in range(2):
        for s in range(2):
            for got, sent in zip(landed[r][s], plans[s][0]):
                assert torch.equal(got, sent)
    os.close(abort_r)
    os.close(abort_w)
    for pairs in links:
        for a, b in pairs:
            a.close()
            b.close()


def _read_stream(sock: socket.socket, nbytes: int) -> bytes:
    sock.setblocking(True)
    data = b""
    while len(data) < nbytes:
        more = sock.recv(nbytes - len(data))
        assert more, "stream ended early"
        data += more
    return data


@pytest.mark.timeout(60)
@pytest.mark.parametrize("impl", IMPLS)
def test_the_wire_format_is_header_then_bytes_and_checksum_per_chunk(impl):
    pieces, ends = _plan(SIZES, 3)
    a, b = _tcp_pair()
    abort_r, abort_w = os.pipe()
    header = _header(9)
    out = {}
    sender = _run(lambda: out.setdefault("err", ops.heal_stream([a.fileno()], [pieces], [ends], [header], True, abort_r, 30.0, impl=impl)))
    expected = bytes(header.numpy())
    first = 0
    for end in ends:
        chunk = torch.cat(pieces[first:end]) if end > first else torch.empty(0, dtype=torch.uint8)
        expected += bytes(chunk.numpy()) + ops.checksum(chunk, impl="torch").to_bytes(8, "little")
        first = end
    assert _read_stream(b, len(expected)) == expected
    _join(sender)
    assert out["err"] == ""
    for fd in (abort_r, abort_w):
        os.close(fd)
    a.close()
    b.close()


def _feed(sock: socket.socket, data: bytes, close: bool) -> None:
    sock.setblocking(True)
    sock.sendall(data)
    if close:
        sock.close()


def _receive_fed(wire: bytes, landing: list[torch.Tensor], ends: list[int], impl: str, close: bool = False) -> str:
    """Receive one stream (expecting _header(1)) from a peer that writes `wire` raw (and then
    closes the connection if `close`); the executor's result."""
    a, b = _tcp_pair()
    abort_r, abort_w = os.pipe()
    feeder = _run(_feed, a, wire, close)
    try:
        return ops.heal_stream([b.fileno()], [landing], [ends], [_header(1)], False, abort_r, 30.0, impl=impl)
    finally:
        _join(feeder)
        for fd in (abort_r, abort_w):
            os.close(fd)
        a.close()
        b.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("impl", IMPLS)
def test_a_corrupted_chunk_is_refused(impl):
    pieces, ends = _plan([[100, 28], [64]], 4)
    first = bytes(torch.cat(pieces[:2]).numpy())
    second = bytearray(pieces[2].numpy().tobytes())
    wire = bytes(_header(1).numpy()) + first + ops.checksum(torch.cat(pieces[:2])).to_bytes(8, "little")
    good = ops.checksum(pieces[2]).to_bytes(8, "little")
    second[17] ^= 0x10  # one flipped bit on the way
    landing = [torch.zeros_like(p) for p in pieces]
    err = _receive_fed(wire + bytes(second) + good, landing, ends, impl)
    assert err == "stream 0: chunk 1 arrived corrupted (checksum mismatch)"
    assert torch.equal(torch.cat(landing[:2]), torch.cat(pieces[:2]))  # chunk 0 was fine


@pytest.mark.timeout(60)
@pytest.mark.parametrize("impl", IMPLS)
def test_a_header_mismatch_stops_before_any_data_is_read(impl):
    _, ends = _plan([[64]], 5)
    landing = [torch.full((64,), 7, dtype=torch.uint8)]
    err = _receive_fed(bytes(_header(2).numpy()) + bytes(64 + 8), landing, ends, impl)
    assert err == "stream 0: stream header mismatch (the source's state layout or plan differs)"
    assert bool((landing[0] == 7).all())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("impl", IMPLS)
def test_a_source_going_away_mid_stream_fails_the_receiver_at_once(impl):
    pieces, ends = _plan([[1 << 16], [1 << 16]], 6)
    landing = [torch.zeros_like(p) for p in pieces]
    # the source dies after half of its first chunk
    err = _receive_fed(bytes(_header(1).numpy()) + bytes(1 << 15), landing, ends, impl, close=True)
    assert err == "stream 0: peer closed the connection"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("impl", IMPLS)
def test_a_receiver_going_away_fails_the_source(impl):
    pieces, ends = _plan([[8 << 20]], 7)  # more than the socket buffers hold
    a, b = _tcp_pair()
    abort_r, abort_w = os.pipe()
    b.close()
    err = ops.heal_stream([a.fileno()], [pieces], [ends], [_header(1)], True, abort_r, 30.0, impl=impl)
    assert err.startswith("stream 0: send failed: "), err
    for fd in (abort_r, abort_w):
        os.close(fd)
    a.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("sending", [False, True])
def test_abort_and_deadline_stop_a_stream_whose_peer_is_silent(impl, sending):
    pieces, ends = _plan([[8 << 20]], 8)
    a, b = _tcp_pair()
    abort_r, abort_w = os.pipe()
    mine = a if sending else b
    threading.Timer(0.3, os.write, (abort_w, b"x")).start()
    err = ops.heal_stream([mine.fileno()], [pieces], [ends], [_header(1)], sending, abort_r, 30.0, impl=impl)
    assert err == "aborted"
    quiet_r, quiet_w = os.pipe()
    err = ops.heal_stream([mine.fileno()], [pieces], [ends], [_header(1)], sending, quiet_r, 0.3, impl=impl)
    assert err == "timed out"
    for fd in (abort_r, abort_w, quiet_r, quiet_w):
        os.close(fd)
    a.close()
    b.close()


def test_bad_plans_are_refused_with_a_clear_error():
    a, b = _tcp_pair()
    with pytest.raises(ValueError, match="one entry per stream"):
        ops.heal_stream([a.fileno()], [], [], [], True, 0, 1.0)
    with pytest.raises(ValueError, match="contiguous uint8 CPU"):
        ops.heal_stream([a.fileno()], [[torch.zeros(4)]], [[1]], [_header(1)], True, 0, 1.0)
    with pytest.raises(ValueError, match="non-decreasing"):
        ops.heal_stream([a.fileno()], [[torch.zeros(4, dtype=torch.uint8)]], [[2]], [_header(1)], True, 0, 1.0)
    with pytest.raises(ValueError, match="header 0"):
        ops.heal_stream([a.fileno()], [[]], [[]], [torch.zeros(0, dtype=torch.uint8)], True, 0, 1.0)
    a.close()
    b.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("send_impl", IMPLS)
def test_a_chunk_of_more_pieces_than_iov_max_goes_through(send_impl):
    # a packed chunk of many scalars (e.g. optimizer step counters): more pieces than one
    # sendmsg/recvmsg may carry (IOV_MAX = 1024)
    pieces, ends = _plan([[4] * 1500 + [3]], 9)
    a, b = _tcp_pair()
    abort_r, abort_w = os.pipe()
    landing = [torch.zeros_like(p) for p in pieces]
    out = {}
    sender = _run(lambda: out.setdefault("err", ops.heal_stream(
        [a.fileno()], [pieces], [ends], [_header(1)], True, abort_r, 30.0, impl=send_impl)))
    err = ops.heal_stream([b.fileno()], [landing], [ends], [_header(1)], False, abort_r, 30.0, impl="torch")
    _join(sender)
    assert (out["err"], err) == ("", "")
    assert torch.equal(torch.cat(landing), torch.cat(pieces))
    for fd in (abort_r, abort_w):
        os.close(fd)
    a.close()
    b.close()


@pytest.mark.timeout(60)
def test_send_and_receive_plans_describe_the_same_streams():
    # healing.send_plan (each source) and receive_plan (the receiver) are built apart, on
    # different processes' helper threads; their streams must match byte for byte.
    from lococomm.ft.healing import Background, receive_plan, send_plan
    from lococomm.ft.state import ReplicatedState

    def state(seed: int) -> ReplicatedState:
        g = torch.Generator().manual_seed(seed)
        s = ReplicatedState()
        s.register(
            "t",
            {
                "big": torch.randn(300_001, generator=g),  # split over chunks
                "flags": torch.rand(1001, generator=g) > 0.5,  # bool travels as uint8
                "small": torch.randint(0, 9, (13,), generator=g, dtype=torch.int16),
                "empty": torch.zeros(0),
            },
        )
        return s

    source, joiner = state(1), state(2)
    snap = source.snapshot()
    meta = {"specs": [s.to_json() for s in snap.specs], "sources": [3, 5], "chunk_bytes": 256 << 10}
    plans = [Background(lambda r=r: send_plan(snap, meta, r), "test").result() for r in (3, 5)]
    own = joiner.snapshot()
    recv = receive_plan(meta, own.specs, own.tensors)
    assert [p.header.tolist() for p in plans] == [h.tolist() for h in recv.headers]
    pairs = [_tcp_pair() for _ in plans]
    abort_r, abort_w = os.pipe()
    errors: list[str] = []

    def source(plan, sock) -> None:
        errors.append(ops.heal_stream([sock.fileno()], [plan.pieces], [plan.ends], [plan.header], True, abort_r, 30.0))

    threads = [_run(source, p, a) for p, (a, _) in zip(plans, pairs)]
    err = ops.heal_stream([b.fileno() for _, b in pairs], recv.pieces, recv.ends, recv.headers, False, abort_r, 30.0)
    _join(*threads)
    assert err == "" and errors == ["", ""]
    for s, mine, theirs in zip(snap.specs, own.tensors, snap.tensors):
        assert torch.equal(mine, theirs), s.path
    for a, b in pairs:
        a.close()
        b.close()
    os.close(abort_r)
    os.close(abort_w)
    with pytest.raises(ZeroDivisionError):
        Background(lambda: 1 // 0, "test").result()
