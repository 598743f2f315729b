"""The coordinator's decisions as a pure state machine: who is in, which epoch, did a step commit.

No sockets and no clocks here: the server feeds events (with the current time) and carries out
the returned actions (send a message to a connection, close a connection). That keeps every rule
below unit-testable without processes.

Worker states (one registered connection = one worker = one rank of one replica group):

    state     | event                                   | next state / effect
    ----------+-----------------------------------------+---------------------------------------
    idle      | quorum request                          | waiting (a live epoch gets
              |                                         |   `reconfigure` at its next commit)
    waiting   | quorum closes with its replica ready    | member of epoch E (gets its ranks)
    member    | vote ok, all members voted ok           | member; epoch step += 1; if a join is
              |                                         |   pending the epoch ends (reconfigure)
    member    | vote not ok / cancel / signature clash  | epoch E dies: decision False to all
    member    | quorum request while E is live          | epoch E dies ("member re-quorums")
    any       | connection closed / leave / heartbeat   | worker removed; if it was a member, E
              |   older than heartbeat_timeout          |   dies: decision False pushed to all
    any       | same (replica, group rank) registers    | old connection closed as a crash; the
              |   again                                 |   newcomer is a new worker (healed)

A quorum (the next epoch) forms only when no epoch is live, every healthy replica of the last
epoch is ready (all its ranks waiting), at least `min_workers` replicas are ready (at least
`initial_workers` for the coordinator's first epoch, bounded by `quorum_timeout`), and no
freshly registered worker is still expected (bounded by `join_timeout`; after a coordinator
restart, by `recovery_timeout` for the members the workers report from their last epoch).
Required replicas that never ask are dropped after `quorum_timeout`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

MAX_SIGNATURES_REPORTED = 64


@dataclass
class Send:
    conn: int
    message: dict[str, Any]


@dataclass
class Close:
    conn: int
    reason: str


Action = Send | Close


@dataclass
class Worker:
    conn: int
    replica_id: str
    group_rank: int
    group_world_size: int
    incarnation: int
    step: int
    last_epoch: int
    last_members: list[str]
    registered_at: float
    last_seen: float
    waiting: bool = False
    synced: bool = False  # its replicated state is known to match the others' (not fresh)
    requested_at: float = 0.0
    epoch: int | None = None
    info: dict[str, Any] = field(default_factory=dict)
    host: str = ""  # where its peers reach it (heals spread over sources on distinct hosts)


@dataclass
class Epoch:
    number: int
    replicas: list[str]
    conns: dict[str, list[int]]  # replica id -> connection per group rank
    step: int  # committed steps of this epoch's state when it started, +1 per commit
    formed_at: float
    live: bool = True
    end_reason: str = ""
    votes: dict[int, dict[str, Any]] = field(default_factory=dict)
    last_decision: tuple[int, bool, str] | None = None
    pending_join: bool = False

    def all_conns(self) -> list[int]:
        return [c for r in self.replicas for c in self.conns[r]]


@dataclass
class Event:
    """A membership event kept for the run summary (kind: crash, hang, join, leave, epoch...)."""

    time: float
    kind: str
    replica_id: str
    detail: str
    epoch: int


class QuorumState:
    """All membership and commit decisions of one coordinator."""

    def __init__(
        self,
        heartbeat_timeout: float = 5.0,
        min_workers: int = 1,
        join_timeout: float = 0.5,
        quorum_timeout: float = 60.0,
        recovery_timeout: float = 5.0,
        initial_workers: int | None = None,
        single_job: bool = False,
        resume: bool = False,
        now: float = 0.0,
    ) -> None:
        if heartbeat_timeout <= 0:
            raise ValueError(f"heartbeat_timeout must be > 0 seconds, got {heartbeat_timeout}")
        if min_workers < 1:
            raise ValueError(f"min_workers must be >= 1, got {min_workers}")
        self.heartbeat_timeout = heartbeat_timeout
        self.min_workers = min_workers
        self.initial_workers = max(min_workers, initial_workers or 0)
        self.single_job = single_job
        # This coordinator takes over a running job (a restart on the same address): its first
        # epoch must not be formed from fresh workers alone before the previous members have
        # had recovery_timeout to report back -- a fresh worker that reconnects first would
        # otherwise start a second history at step 0.
        self.resume = resume
        self.join_timeout = join_timeout
        self.quorum_timeout = quorum_timeout
        self.recovery_timeout = recovery_timeout
        self.started_at = now
        self.workers: dict[int, Worker] = {}
        self.current: Epoch | None = None
        self.epoch_counter = 0
        self._incarnations = 0
        self._last_members: list[str] = []
        self._last_incarnations: dict[str, tuple[int, ...]] = {}
        self._round_started: float | None = None
        self._regression_logged = -1e9
        self.events: list[Event] = []
        self.max_committed_step = 0
        self.finals: dict[str, dict[str, Any]] = {}  # replica -> {"step", "digest"} at leave

    # ------------------------------------------------------------------ events
    def register(
        self,
        conn: int,
        replica_id: str,
        group_rank: int,
        group_world_size: int,
        step: int,
        last_epoch: int,
        last_members: list[str],
        now: float,
        host: str = "",
    ) -> list[Action]:
        """A connection authenticated and asked to join (`host`: where its peers reach it, ""
        if it did not say). Returns the welcome (or refusal)."""
        actions: list[Action] = []
        if not 0 <= group_rank < group_world_size:
            return [Close(conn, f"group_rank {group_rank} outside [0, {group_world_size})")]
        for other in list(self.workers.values()):
            if other.replica_id != replica_id:
                continue
            if other.group_rank == group_rank:
                actions += self._remove(other.conn, "replaced by a new incarnation", "crash", now)
                actions.append(Close(other.conn, "replaced by a new incarnation"))
            elif other.group_world_size != group_world_size:
                return actions + [
                    Close(
                        conn,
                        f"replica {replica_id!r} has group_world_size "
                        f"{other.group_world_size}, this rank says {group_world_size}",
                    )
                ]
        self._incarnations += 1
        worker = Worker(
            conn=conn,
            replica_id=replica_id,
            group_rank=group_rank,
            group_world_size=group_world_size,
            incarnation=self._incarnations,
            step=step,
            last_epoch=last_epoch,
            last_members=list(last_members),
            registered_at=now,
            last_seen=now,
            host=host,
        )
        self.workers[conn] = worker
        self.epoch_counter = max(self.epoch_counter, last_epoch)
        if last_epoch > 0:
            self.max_committed_step = max(self.max_committed_step, step)
        self._event(now, "register", replica_id, f"rank {group_rank}, step {step}")
        actions.append(
            Send(
                conn,
                {
                    "type": "welcome",
                    "incarnation": worker.incarnation,
                    "heartbeat_timeout": self.heartbeat_timeout,
                },
            )
        )
        return actions

    def touch(self, conn: int, now: float) -> None:
        """Any message from a worker proves it is alive."""
        worker = self.workers.get(conn)
        if worker is not None:
            worker.last_seen = now

    def disconnect(
        self,
        conn: int,
        reason: str,
        now: float,
        kind: str = "crash",
        final: dict[str, Any] | None = None,
    ) -> list[Action]:
        """The connection is gone (closed, expelled, left). Ends its epoch if it was a member.
        A graceful leave may report its final step and state digest (`final`)."""
        worker = self.workers.get(conn)
        if worker is not None and final is not None:
            self.finals[worker.replica_id] = final
        actions = self._remove(conn, reason, kind, now)
        return actions + self._maybe_form_epoch(now)

    def request_quorum(self, conn: int, step: int, now: float, synced: bool = True) -> list[Action]:
        worker = self.workers[conn]
        worker.step = step
        worker.synced = synced
        actions: list[Action] = []
        epoch = self.current
        if epoch is not None and epoch.live and worker.epoch == epoch.number:
            actions += self._end_epoch(
                epoch, f"member {worker.replica_id} asked for a new quorum", now
            )
        elif epoch is not None and epoch.live and not epoch.pending_join:
            epoch.pending_join = True
            self._event(now, "join-request", worker.replica_id, "", epoch.number)
            log.info(
                "%s asks to join: epoch %d reconfigures at its next commit", worker.replica_id, epoch.number
            )
        worker.waiting = True
        worker.requested_at = now
        worker.epoch = None
        if self._round_started is None:
            self._round_started = now
        return actions + self._maybe_form_epoch(now)

    def vote(
        self,
        conn: int,
        epoch_number: int,
        step: int,
        ok: bool,
        signature: str,
        signatures: list[str],
        reason: str,
        info: dict[str, Any],
        now: float,
        digest: str = "",
        tensor_digests: list[str] | None = None,
    ) -> list[Action]:
        """A member's commit vote for `step` of `epoch_number` (with a state digest on parity
        steps)."""
        worker = self.workers[conn]
        if info:
            worker.info = info
        epoch = self.current
        if epoch is None or epoch.number != epoch_number or worker.epoch != epoch_number:
            return [Send(conn, self._decision(epoch_number, step, False, True, "epoch is over"))]
        if epoch.last_decision is not None and epoch.last_decision[0] == step:
            _, decided_ok, why = epoch.last_decision
            return [Send(conn, self._decision(epoch_number, step, decided_ok, not epoch.live, why))]
        if not epoch.live:
            return [Send(conn, self._decision(epoch_number, step, False, True, epoch.end_reason))]
        if step != epoch.step:
            return self._decide(
                epoch,
                False,
                f"member {worker.replica_id} voted for step {step}, epoch is at step {epoch.step}",
            )
        if not ok:
            why = f"member {worker.replica_id} failed the step: {reason or 'no reason given'}"
            return self._decide(epoch, False, why)
        epoch.votes[conn] = {
            "signature": signature,
            "signatures": signatures[:MAX_SIGNATURES_REPORTED],
            "digest": digest,
            "tensor_digests": tensor_digests or [],
        }
        if len(epoch.votes) < len(epoch.all_conns()):
            return []
        clash = self._signature_clash(epoch)
        if clash:
            return self._decide(epoch, False, clash)
        resync, why = self._parity_mismatch(epoch)
        if resync:
            self._event(now, "parity-mismatch", ",".join(sorted(resync)), why, epoch.number)
            return self._decide(epoch, False, why, resync)
        return self._decide(epoch, True, "")

    def tick(self, now: float) -> list[Action]:
        """Periodic check: expel silent workers, close quorums whose waits expired."""
        actions: list[Action] = []
        for worker in list(self.workers.values()):
            silent = now - worker.last_seen
            if silent > self.heartbeat_timeout:
                why = f"no heartbeat for {silent:.2f}s (timeout {self.heartbeat_timeout}s)"
                actions.append(Send(worker.conn, {"type": "expelled", "reason": why}))
                actions.append(Close(worker.conn, why))
                actions += self._remove(worker.conn, why, "hang", now)
        return actions + self._maybe_form_epoch(now)

    # ------------------------------------------------------------------ queries
    def snapshot(self) -> dict[str, Any]:
        """A JSON-able view for status lines and tests."""
        epoch = self.current
        return {
            "epoch": epoch.number if epoch else self.epoch_counter,
            "live": bool(epoch and epoch.live),
            "members": list(epoch.replicas) if epoch else [],
            "step": epoch.step if epoch else self.max_committed_step,
            "committed": self.max_committed_step,
            "workers": len(self.workers),
            "waiting": sorted({w.replica_id for w in self.workers.values() if w.waiting}),
            "info": {w.replica_id: w.info for w in self.workers.values() if w.info},
        }

    # ------------------------------------------------------------------ internals
    def _event(self, now: float, kind: str, replica_id: str, detail: str, epoch: int = -1) -> None:
        if epoch < 0:
            epoch = self.current.number if self.current else self.epoch_counter
        self.events.append(Event(now, kind, replica_id, detail, epoch))
        if len(self.events) > 10000:
            del self.events[:5000]

    def _remove(self, conn: int, reason: str, kind: str, now: float) -> list[Action]:
        worker = self.workers.pop(conn, None)
        if worker is None:
            return []
        log.info("worker %s rank %d gone (%s): %s", worker.replica_id, worker.group_rank, kind, reason)
        self._event(now, kind, worker.replica_id, reason)
        epoch = self.current
        if kind == "leave" and epoch is not None and worker.epoch == epoch.number:
            still_in = [w for w in self.workers.values() if w.epoch == epoch.number]
            if not still_in:
                # Every member of the last epoch left gracefully: the job is complete, and
                # (unless this coordinator serves a single job) newcomers start a new one.
                log.info("all members left after step %d: the job is complete", epoch.step)
                if not self.single_job:
                    self.max_committed_step = 0
                    self._last_members = []
        if epoch is not None and epoch.live and worker.epoch == epoch.number:
            return self._end_epoch(epoch, f"member {worker.replica_id} {kind}: {reason}", now)
        return []

    def _decision(
        self,
        epoch: int,
        step: int,
        ok: bool,
        reconfigure: bool,
        reason: str,
        resync: dict[str, int] | None = None,
    ) -> dict:
        return {
            "type": "decision",
            "epoch": epoch,
            "step": step,
            "ok": ok,
            "reconfigure": reconfigure,
            "reason": reason,
            "resync": resync or {},
        }

    def _decide(
        self,
        epoch: Epoch,
        ok: bool,
        reason: str,
        resync: dict[str, int] | None = None,
        ended: bool = False,
    ) -> list[Action]:
        step = epoch.step
        epoch.last_decision = (step, ok, reason)
        epoch.votes.clear()
        if ok:
            epoch.step += 1
            self.max_committed_step = max(self.max_committed_step, epoch.step)
            if epoch.pending_join:
                epoch.live = False
                epoch.end_reason = "reconfiguring to admit joiners"
        else:
            epoch.live = False
            epoch.end_reason = reason
            if ended:
                log.info("epoch %d ends at step %d: %s", epoch.number, step, reason)
            else:
                log.warning("epoch %d step %d failed: %s", epoch.number, step, reason)
        message = self._decision(epoch.number, step, ok, not epoch.live, reason, resync)
        return [Send(c, message) for c in epoch.all_conns() if c in self.workers]

    def _end_epoch(self, epoch: Epoch, reason: str, now: float) -> list[Action]:
        """Kill a live epoch: every member still connected learns its current step failed."""
        self._event(now, "epoch-end", "", reason, epoch.number)
        return self._decide(epoch, False, reason, ended=True)

    def _signature_clash(self, epoch: Epoch) -> str:
        by_sig: dict[str, list[int]] = {}
        for conn, vote in epoch.votes.items():
            by_sig.setdefault(vote["signature"], []).append(conn)
        if len(by_sig) <= 1:
            return ""
        lists = {self.workers[c].replica_id: epoch.votes[c]["signatures"] for c in epoch.votes}
        names = sorted(lists)
        first = lists[names[0]]
        for name in names[1:]:
            other = lists[name]
            for i in range(max(len(first), len(other))):
                a = first[i] if i < len(first) else "<none>"
                b = other[i] if i < len(other) else "<none>"
                if a != b:
                    return (
                        f"collective #{i} differs across members: {names[0]} ran {a}, "
                        f"{name} ran {b}"
                    )
        return "collective signatures differ across members"

    def _parity_mismatch(self, epoch: Epoch) -> tuple[dict[str, int], str]:
        """Compare state digests (per local rank: each holds its own shard). Returns the
        replicas that differ from the majority, each with the first differing tensor index."""
        votes = {c: v for c, v in epoch.votes.items() if v["digest"]}
        if not votes:
            return {}, ""
        resync: dict[str, int] = {}
        details = []
        by_rank: dict[int, list[int]] = {}
        for conn in votes:
            by_rank.setdefault(self.workers[conn].group_rank, []).append(conn)
        for conns in by_rank.values():
            groups: dict[str, list[int]] = {}
            for conn in conns:
                groups.setdefault(votes[conn]["digest"], []).append(conn)
            if len(groups) <= 1:
                continue
            order = {c: i for i, c in enumerate(epoch.all_conns())}
            # Majority wins; a tie goes to the group holding the lowest-ranked member.
            majority = max(groups.values(), key=lambda g: (len(g), -min(order[c] for c in g)))
            reference = votes[majority[0]]["tensor_digests"]
            for group in groups.values():
                if group is majority:
                    continue
                for conn in group:
                    mine = votes[conn]["tensor_digests"]
                    first = next(
                        (i for i, (a, b) in enumerate(zip(mine, reference)) if a != b),
                        min(len(mine), len(reference)),
                    )
                    replica = self.workers[conn].replica_id
                    resync[replica] = first
                    details.append(f"{replica} (tensor #{first})")
        if not resync:
            return {}, ""
        return resync, (
            f"bit-parity mismatch at step {epoch.step}: {', '.join(details)} differ from the "
            "majority; they will be healed"
        )

    def _replica_ranks(self) -> dict[str, dict[int, Worker]]:
        replicas: dict[str, dict[int, Worker]] = {}
        for w in self.workers.values():
            replicas.setdefault(w.replica_id, {})[w.group_rank] = w
        return replicas

    @staticmethod
    def _incarnations_of(ranks: dict[int, Worker]) -> tuple[int, ...]:
        return tuple(sorted(w.incarnation for w in ranks.values()))

    @staticmethod
    def _complete(ranks: dict[int, Worker]) -> bool:
        size = next(iter(ranks.values())).group_world_size
        return len(ranks) == size and all(r in ranks for r in range(size))

    def _maybe_form_epoch(self, now: float) -> list[Action]:
        if self.current is not None and self.current.live:
            return []
        replicas = self._replica_ranks()
        ready = {
            rid
            for rid, ranks in replicas.items()
            if self._complete(ranks) and all(w.waiting for w in ranks.values())
        }
        if not ready:
            return []
        round_started = self._round_started if self._round_started is not None else now
        waited = now - round_started
        # Members of the last epoch that are still whole (same processes) must take part: they
        # hold the state. A restarted process under an old replica id is a joiner instead.
        required = {
            r
            for r in self._last_members
            if r in replicas
            and self._complete(replicas[r])
            and self._incarnations_of(replicas[r]) == self._last_incarnations.get(r)
        }
        if not self._last_members and self.current is None:
            # Fresh coordinator: wait (bounded) for the members the workers report from before.
            reported = [w for w in self.workers.values() if w.last_epoch > 0]
            if not reported and self.resume and now - self.started_at < self.recovery_timeout:
                return []
            if reported:
                newest = max(w.last_epoch for w in reported)
                for w in reported:
                    if w.last_epoch == newest:
                        required.update(w.last_members)
                if now - self.started_at >= self.recovery_timeout:
                    required &= ready
        if not required <= ready and waited < self.quorum_timeout:
            return []
        if len(ready) < self.min_workers:
            return []
        best = max(min(w.step for w in replicas[r].values()) for r in ready)
        if best < self.max_committed_step:
            # Everyone holding the state of step max_committed_step is gone (crashed): forming
            # an epoch now would silently restart training from an older state.
            if now - self._regression_logged > 10.0:
                self._regression_logged = now
                log.error(
                    "refusing to form an epoch at step %d: step %d was committed and no worker "
                    "holding it is connected (resume the workers from a checkpoint with "
                    "Manager.resume(step), or restart the coordinator to start over)",
                    best,
                    self.max_committed_step,
                )
            return []
        resuming = any(w.last_epoch > 0 for w in self.workers.values())
        if (
            self.current is None
            and not resuming  # after a coordinator restart the reported members count instead
            and len(ready) < self.initial_workers
            and waited < self.quorum_timeout
        ):
            return []
        fresh = [
            w
            for w in self.workers.values()
            if not w.waiting and now - w.registered_at < self.join_timeout
        ]
        if fresh and waited < self.join_timeout:
            return []
        return self._form_epoch(sorted(ready), replicas, now)

    def _form_epoch(
        self, ready: list[str], replicas: dict[str, dict[int, Worker]], now: float
    ) -> list[Action]:
        previous = [r for r in self._last_members if r in ready]
        order = previous + sorted(r for r in ready if r not in previous)
        self.epoch_counter += 1
        number = self.epoch_counter
        steps = {r: min(w.step for w in replicas[r].values()) for r in order}
        synced = {r: all(w.synced for w in replicas[r].values()) for r in order}
        max_step = max(steps.values())
        epoch = Epoch(
            number=number,
            replicas=order,
            conns={r: [replicas[r][g].conn for g in sorted(replicas[r])] for r in order},
            step=max_step,
            formed_at=now,
        )
        self.current = epoch
        self._last_members = list(order)
        self._last_incarnations = {r: self._incarnations_of(replicas[r]) for r in order}
        self._round_started = None
        self.max_committed_step = max(self.max_committed_step, max_step)
        self._event(now, "epoch", "", f"members {order} at step {max_step}", number)
        log.info("epoch %d: %d replicas %s, step %d", number, len(order), order, max_step)
        actions: list[Action] = []
        plans = {}
        for g in range(max(next(iter(replicas[r].values())).group_world_size for r in order)):
            group = [r for r in order if next(iter(replicas[r].values())).group_world_size > g]
            sources = [r for r in group if steps[r] == max_step and synced[r]]
            if not sources:  # nobody verified yet (fresh start): the first up-to-date one leads
                sources = [next(r for r in group if steps[r] == max_step)]
            plans[g] = (group, sources, [r for r in group if r not in sources])
        healed = any(receivers for _, _, receivers in plans.values())
        for rid in order:
            for g, worker in sorted(replicas[rid].items()):
                group, sources, receivers = plans[g]
                worker.waiting = False
                worker.epoch = number
                actions.append(
                    Send(
                        worker.conn,
                        {
                            "type": "epoch",
                            "epoch": number,
                            "replicas": order,
                            "group_replicas": group,
                            "rank": group.index(rid),
                            "world_size": len(group),
                            "group_rank": g,
                            "store_prefix": f"lococomm/{number}/{g}",
                            "steps": {r: steps[r] for r in group},
                            "max_step": max_step,
                            "sources": sources,
                            "receivers": receivers,
                            "hosts": {r: replicas[r][g].host if g in replicas[r] else "" for r in group},
                            "healed": healed,
                        },
                    )
                )
        return actions


def conns_of(actions: Iterable[Action]) -> set[int]:
    return {a.conn for a in actions}
