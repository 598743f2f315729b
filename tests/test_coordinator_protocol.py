"""Wire format and the coordinator's defences: frames, auth, fuzzing while training runs."""

from __future__ import annotations

import json
import random
import socket
import struct
import time

import pytest

import lococomm as lc
from lococomm.membership import wire


def test_frame_round_trip_and_caps():
    frame = wire.encode_frame({"type": "hb", "x": [1, 2]})
    reader = wire.FrameReader()
    assert reader.feed(frame[:3]) == []
    assert reader.feed(frame[3:] + frame) == [{"v": 1, "type": "hb", "x": [1, 2]}] * 2
    with pytest.raises(wire.ProtocolError, match="exceeds"):
        wire.FrameReader().feed(struct.pack(">I", wire.MAX_FRAME_BYTES + 1))
    with pytest.raises(ValueError, match="frame cap"):
        wire.encode_frame({"type": "x", "blob": "a" * wire.MAX_FRAME_BYTES})
    for body in (b"\xff\xfe", b"[1,2]", b'{"v": 2, "type": "hb"}', b'{"v": 1}', b"not json"):
        with pytest.raises(wire.ProtocolError):
            wire.FrameReader().feed(struct.pack(">I", len(body)) + body)


def test_macs_bind_both_nonces_and_roles():
    a = wire.worker_mac("t", "n1", "n2")
    assert a == wire.worker_mac("t", "n1", "n2")
    assert a != wire.worker_mac("t", "n2", "n1")
    assert a != wire.server_mac("t", "n1", "n2")
    assert a != wire.worker_mac("u", "n1", "n2")
    assert not wire.macs_equal(None, a) and wire.macs_equal(a, a)


def test_no_token_means_loopback_only():
    with pytest.raises(ValueError, match="without a token"):
        lc.Coordinator(host="0.0.0.0")
    assert wire.is_loopback_host("127.0.0.1") and wire.is_loopback_host("localhost")
    assert not wire.is_loopback_host("0.0.0.0")


def _raw(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=2)
    return sock


def _fuzz_once(address: str, rng: random.Random, token: str) -> None:
    sock = _raw(address)
    try:
        hello = wire.recv_frame(sock)
        kind = rng.randrange(10)
        if kind == 0:
            sock.sendall(rng.randbytes(rng.randrange(1, 3000)))
        elif kind == 1:
            body = rng.randbytes(rng.randrange(0, 200))
            sock.sendall(struct.pack(">I", len(body)) + body)
        elif kind == 2:
            sock.sendall(struct.pack(">I", rng.randrange(wire.MAX_FRAME_BYTES + 1, 1 << 32)) + b"x" * 64)
        elif kind == 3:
            # Truncated: a frame that never completes. The coordinator can only see it end
            # (or time the registration out), so hang up half-way.
            sock.sendall(struct.pack(">I", 100) + b"{" * rng.randrange(1, 99))
            sock.shutdown(socket.SHUT_WR)
        elif kind == 4:
            msg = rng.choice([{"v": 9, "type": "register"}, {"v": 1}, {"v": 1, "type": 5}, [1, 2, 3]])
            body = json.dumps(msg).encode()
            sock.sendall(struct.pack(">I", len(body)) + body)
        elif kind == 5:  # well-formed register with a wrong MAC
            sock.sendall(wire.encode_frame({
                "type": "register", "replica_id": f"fuzz{rng.random()}", "group_rank": 0,
                "group_world_size": 1, "client_nonce": "00", "mac": "ab" * 32,
            }))
        elif kind == 6:  # out-of-protocol first message
            sock.sendall(wire.encode_frame({"type": rng.choice(["vote", "quorum", "hb", "leave"])}))
        elif kind == 7:  # authenticated, then malformed messages
            client_nonce = wire.new_nonce()
            sock.sendall(wire.encode_frame({
                "type": "register", "replica_id": f"fuzz-{rng.randrange(1 << 30)}", "group_rank": 0,
                "group_world_size": 1, "client_nonce": client_nonce,
                "mac": wire.worker_mac(token, hello["nonce"], client_nonce),
            }))
            assert wire.recv_frame(sock)["type"] == "welcome"
            bad = rng.choice([
                {"type": "vote", "epoch": "x"}, {"type": "vote", "epoch": 1, "step": 0, "ok": "yes"},
                {"type": "quorum"}, {"type": "nonsense"}, {"type": "vote", "epoch": 1, "step": 0,
                "ok": True, "signatures": [1, 2]}, {"type": "vote", "info": [1]},
            ])
            sock.sendall(wire.encode_frame(bad))
        elif kind == 8:  # authenticated register saying nonsense about its host
            client_nonce = wire.new_nonce()
            sock.sendall(wire.encode_frame({
                "type": "register", "replica_id": f"fuzz-{rng.randrange(1 << 30)}", "group_rank": 0,
                "group_world_size": 1, "client_nonce": client_nonce, "host": rng.choice(["h" * 300, 7, ["a"]]),
                "mac": wire.worker_mac(token, hello["nonce"], client_nonce),
            }))
        else:  # register with nonsense fields
            sock.sendall(wire.encode_frame({
                "type": "register", "replica_id": rng.choice(["", "x" * 300, 5]),
                "group_rank": rng.choice([-1, 10, "a"]), "group_world_size": rng.choice([0, 1 << 20]),
                "client_nonce": "00", "mac": "00",
            }))
        sock.settimeout(2)
        try:
            while sock.recv(4096):
                pass  # the coordinator must close on us
        except TimeoutError:
            raise AssertionError(f"coordinator kept a bad connection open (case {kind})") from None
        except OSError:
            pass
    finally:
        sock.close()


@pytest.mark.timeout(180)
def test_fuzzed_frames_close_only_their_connection_and_training_carries_on(workers, coordinator_factory):
    token = "fuzz-token"
    coordinator = coordinator_factory(token=token, heartbeat_timeout=2.0, initial_workers=2)
    for i in range(2):
        workers.start(
            f"w{i}", "fault_worker.py", "--coordinator", coordinator.address, "--replica", f"w{i}",
            "--steps", "400", "--numel", "1024", "--token", token, "--step-sleep", "0.02",
        )
    workers.wait_for(lambda: len(workers.records("w0", "step")) > 5, 60, "training to start")
    rng = random.Random(1234)
    started = time.monotonic()
    for _ in range(2500):
        _fuzz_once(coordinator.address, rng, token)
    fuzz_seconds = time.monotonic() - started
    fuzz_end = time.time()
    for name in ("w0", "w1"):
        assert workers.wait_exit(name, 120) == 0, workers.dump()
        rows = workers.records(name, "step")
        # Not one step failed: the fuzzing never touched the real workers' epoch.
        assert [r["step"] for r in rows if r["committed"]] == list(range(400))
        assert all(r["committed"] for r in rows)
    assert len(coordinator._conns) == 0
    assert fuzz_seconds < 120
    # The fuzzing really overlapped training (the workers were still stepping when it ended).
    assert max(r["time"] for r in workers.records("w0", "step")) > fuzz_end
