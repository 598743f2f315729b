"""A worker's conversation with the coordinator: quorum requests, votes, decisions.

Wraps the connection (`membership.client.CoordinatorClient`) with the waits the step protocol
needs. Messages arrive on the client's reader thread and land in a small table under one
condition; the manager's thread waits on it. Pushes that end an epoch (a failed decision for
an epoch, a lost connection) are forwarded at once through `on_abort` so in-flight
collectives can give up.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from lococomm.ft.epoch import EpochInfo
from lococomm.membership.client import CoordinatorClient, CoordinatorUnavailable

log = logging.getLogger(__name__)

_KEPT_DECISIONS = 32


class CoordinatorSession:
    """Quorum requests and commit votes over one (reconnecting) coordinator connection."""

    def __init__(
        self,
        address: str,
        replica_id: str,
        group_rank: int,
        group_world_size: int,
        token: str | None,
        registration: Callable[[str], dict[str, Any]],
        on_abort: Callable[[int | None, str], None],
        connect_timeout: float,
        reconnect_timeout: float,
        heartbeat_interval: float | None,
    ) -> None:
        self._cond = threading.Condition()
        self._epoch_message: dict[str, Any] | None = None
        self._decisions: dict[tuple[int, int], dict[str, Any]] = {}
        self._on_abort = on_abort
        self.replica_id = replica_id
        self.client = CoordinatorClient(
            address,
            replica_id,
            group_rank,
            group_world_size,
            token,
            registration=registration,
            on_message=self._on_message,
            on_connection_change=self._on_connection_change,
            connect_timeout=connect_timeout,
            reconnect_timeout=reconnect_timeout,
            heartbeat_interval=heartbeat_interval,
        )
        self.client.connect()

    # ------------------------------------------------------------------ requests
    def check(self) -> None:
        """Raise if the connection was given up for good."""
        if self.client.failure:
            raise CoordinatorUnavailable(self.client.failure)

    def request_epoch(self, step: int, synced: bool, deadline: float, timeout: float) -> EpochInfo:
        """Ask to take part in the next epoch and wait for it (re-asking after a reconnect)."""
        while True:
            self.check()
            generation = self.client.generation
            with self._cond:
                self._epoch_message = None
            sent = self.client.send({"type": "quorum", "step": step, "synced": synced})
            message = self._wait_epoch_message(generation, sent, deadline, timeout)
            if message is not None:
                return EpochInfo.from_message(message)

    def failed_decision(self, epoch: int) -> str | None:
        """Reason of a failed decision already received for `epoch`, if any."""
        with self._cond:
            for (number, _), decision in self._decisions.items():
                if number == epoch and not decision["ok"]:
                    return str(decision.get("reason"))
        return None

    def vote(self, message: dict[str, Any]) -> int | None:
        """Send a commit vote; returns the connection generation it went out on (None if not
        connected), to be passed to `wait_decision`."""
        # Read before sending: if the connection is replaced after this point, the vote may
        # have gone to a coordinator that died with it, and no decision will ever come.
        generation = self.client.generation
        return generation if self.client.send({"type": "vote", **message}) else None

    def wait_decision(
        self, key: tuple[int, int], timeout: float, generation: int | None = None
    ) -> dict[str, Any] | None:
        """The coordinator's decision on (epoch, step), or None if it cannot be known (the
        connection the vote went out on, `generation`, dropped). After `timeout` seconds our
        vote is withdrawn (the coordinator then decides False unless it already decided)."""
        if generation is None:
            generation = self.client.generation
        deadline = time.monotonic() + timeout
        withdrawn = False
        with self._cond:
            while key not in self._decisions:
                if self.client.generation != generation or not self.client.connected:
                    return None
                now = time.monotonic()
                if now >= deadline:
                    if withdrawn:
                        return None
                    withdrawn = True
                    deadline = now + max(1.0, timeout / 4)
                    self.client.send(
                        {
                            "type": "vote",
                            "epoch": key[0],
                            "step": key[1],
                            "ok": False,
                            "reason": "timed out waiting for the commit decision",
                        }
                    )
                    continue
                self._cond.wait(min(0.5, deadline - now))
            return self._decisions[key]

    def close(self, final: dict[str, Any]) -> None:
        self.client.close(leave=True, final=final)

    # ------------------------------------------------------------------ reader thread
    def _on_message(self, message: dict[str, Any]) -> None:
        abort: tuple[int, str] | None = None
        with self._cond:
            kind = message["type"]
            if kind == "epoch":
                self._epoch_message = message
            elif kind == "decision":
                key = (int(message["epoch"]), int(message["step"]))
                self._decisions[key] = message
                if len(self._decisions) > 2 * _KEPT_DECISIONS:
                    for old in sorted(self._decisions)[:-_KEPT_DECISIONS]:
                        del self._decisions[old]
                if not message["ok"]:
                    abort = (key[0], str(message.get("reason", "step failed")))
            self._cond.notify_all()
        if abort is not None:
            self._on_abort(*abort)

    def _on_connection_change(self, reason: str) -> None:
        self._on_abort(None, f"coordinator connection: {reason}")
        with self._cond:
            self._cond.notify_all()

    def _wait_epoch_message(
        self, generation: int, sent: bool, deadline: float, timeout: float
    ) -> dict[str, Any] | None:
        next_log = time.monotonic() + 10.0
        with self._cond:
            while self._epoch_message is None:
                self.check()
                now = time.monotonic()
                if now >= deadline:
                    raise TimeoutError(
                        f"no quorum within {timeout:.0f}s (replica {self.replica_id}); are enough "
                        "workers running (min_workers)?"
                    )
                if not sent or self.client.generation != generation:
                    if not self.client.connected:
                        self._cond.wait(0.1)
                        if not self.client.connected:
                            continue
                    return None  # (re)connected: send the request again
                if now >= next_log:
                    log.info("replica %s waiting for a quorum...", self.replica_id)
                    next_log = now + 10.0
                self._cond.wait(min(0.5, deadline - now))
            return self._epoch_message
