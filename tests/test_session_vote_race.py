"""A vote that went out on a connection which then dropped must not wait for its timeout.

Regression: the connection generation used to be read after the vote was sent, so a
coordinator restart between the two left the worker waiting the full commit timeout (30 s in
the soak test) for a decision the dead coordinator would never send.
"""

from __future__ import annotations

import threading
import time

import pytest

from lococomm.ft.session import CoordinatorSession


class ReconnectingClient:
    """Sends succeed; the connection is replaced right after each send (a restart)."""

    def __init__(self) -> None:
        self.generation = 1
        self.connected = True
        self.sent: list[dict] = []

    def send(self, message: dict) -> bool:
        self.sent.append(message)
        self.generation += 1  # the reader thread reconnected to a fresh coordinator
        return True


def make_session(client: ReconnectingClient) -> CoordinatorSession:
    session = CoordinatorSession.__new__(CoordinatorSession)
    session._cond = threading.Condition()
    session._epoch_message = None
    session._decisions = {}
    session._on_abort = lambda epoch, reason: None
    session.replica_id = "w0"
    session.client = client  # type: ignore[assignment]
    return session


@pytest.mark.timeout(20)
def test_decision_wait_ends_when_the_vote_connection_was_replaced():
    client = ReconnectingClient()
    session = make_session(client)
    generation = session.vote({"epoch": 3, "step": 7, "ok": True})
    assert generation == 1 and client.generation == 2
    started = time.monotonic()
    assert session.wait_decision((3, 7), timeout=30.0, generation=generation) is None
    assert time.monotonic() - started < 1.0


@pytest.mark.timeout(20)
def test_decision_arriving_on_the_same_connection_is_returned():
    client = ReconnectingClient()
    session = make_session(client)
    client.send = lambda message: True  # type: ignore[method-assign]
    generation = session.vote({"epoch": 3, "step": 7, "ok": True})
    decision = {"type": "decision", "epoch": 3, "step": 7, "ok": True, "reason": ""}
    threading.Timer(0.1, session._on_message, args=(decision,)).start()
    assert session.wait_decision((3, 7), timeout=30.0, generation=generation) == decision


@pytest.mark.timeout(20)
def test_vote_on_no_connection_returns_none():
    client = ReconnectingClient()
    client.send = lambda message: False  # type: ignore[method-assign]
    assert make_session(client).vote({"epoch": 1, "step": 0, "ok": True}) is None
