"""One epoch's view for a worker and the process group built for it.

Every epoch gets fresh process groups on the coordinator's TCPStore under the prefix
``lococomm/<epoch>/<group_rank>``; old groups are abandoned (never reused), because a group
with an abandoned op may still be moving bytes of a dead epoch. Building one takes ~3-25 ms on
loopback; it happens on a helper thread so an abort (a member died during rendezvous) stops the
wait immediately instead of after the gloo timeout.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from lococomm.collectives.abort import AbortSignal, build_with_abort
from lococomm.collectives.ring_sockets import RingSockets, connect_ring
from lococomm.ft.heal_links import connect_heal_links

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpochInfo:
    """What the coordinator said about an epoch, from this worker's point of view."""

    number: int
    replicas: tuple[str, ...]  # all member replicas, rank order
    group_replicas: tuple[str, ...]  # members of this local rank's cross-replica group
    rank: int
    world_size: int
    group_rank: int
    store_prefix: str
    steps: dict[str, int]  # committed step each member reported
    max_step: int
    sources: tuple[str, ...] = ()  # members this group heals from (up to date, verified)
    receivers: tuple[str, ...] = ()  # members that must be healed before the first step
    healed: bool = False  # some group of this epoch heals: its first commit checks parity
    hosts: dict[str, str] = field(default_factory=dict)  # member -> host it said it is on

    @classmethod
    def from_message(cls, msg: dict[str, Any]) -> EpochInfo:
        return cls(
            number=int(msg["epoch"]),
            replicas=tuple(msg["replicas"]),
            group_replicas=tuple(msg["group_replicas"]),
            rank=int(msg["rank"]),
            world_size=int(msg["world_size"]),
            group_rank=int(msg["group_rank"]),
            store_prefix=str(msg["store_prefix"]),
            steps={str(k): int(v) for k, v in msg["steps"].items()},
            max_step=int(msg["max_step"]),
            sources=tuple(msg.get("sources", ())),
            receivers=tuple(msg.get("receivers", ())),
            healed=bool(msg.get("healed", False)),
            hosts={str(k): str(v) for k, v in msg.get("hosts", {}).items()},
        )

    def ranks_of(self, replicas: tuple[str, ...]) -> list[int]:
        return [self.group_replicas.index(r) for r in replicas]


def gloo_device(local_address: str) -> Any:
    """The gloo device to use: $GLOO_SOCKET_IFNAME if set, else the address that reaches the
    coordinator (on a loopback coordinator that is loopback, which is what tests want)."""
    interface = os.environ.get("GLOO_SOCKET_IFNAME")
    if interface:
        return dist.ProcessGroupGloo.create_device(interface=interface.split(",")[0])
    host = os.environ.get("LOCOCOMM_GLOO_HOST", local_address)
    return dist.ProcessGroupGloo.create_device(hostname=host)


def ring_host(local_address: str) -> str:
    """The address the native ring's sockets listen on: the one gloo uses (the first IPv4
    address of $GLOO_SOCKET_IFNAME, else LOCOCOMM_GLOO_HOST, else the coordinator route's)."""
    interface = os.environ.get("GLOO_SOCKET_IFNAME")
    if interface:
        import socket

        import psutil

        name = interface.split(",")[0]
        addresses = psutil.net_if_addrs().get(name, [])
        for family in (socket.AF_INET, socket.AF_INET6):
            for address in addresses:
                if address.family == family:
                    return address.address.split("%")[0]  # drop an IPv6 zone suffix
        raise RuntimeError(f"GLOO_SOCKET_IFNAME={name!r} has no IP address")
    return os.environ.get("LOCOCOMM_GLOO_HOST", local_address).strip("[]")


def new_process_group(
    backend: str,
    prefix_store: Any,
    rank: int,
    size: int,
    timeout: float,
    local_address: str,
    device_index: int | None = None,
) -> Any:
    """Create one process group (blocking rendezvous on `prefix_store`)."""
    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timedelta(seconds=timeout)
        opts._devices = [gloo_device(local_address)]
        opts._threads = 2
        return dist.ProcessGroupGloo(prefix_store, rank, size, opts)
    if backend == "nccl":
        import torch

        if device_index is not None:
            torch.cuda.set_device(device_index)
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timedelta(seconds=timeout)
        return dist.ProcessGroupNCCL(prefix_store, rank, size, opts)
    raise ValueError(f"unknown backend {backend!r}; use 'gloo' or 'nccl'")


class EpochGroups:
    """Builds the process groups of each epoch on the coordinator's TCPStore.

    Store clients are re-created whenever the worker re-registered (a restarted coordinator
    hosts a new store, announced in its welcome).

    Rendezvous never share a client: a TCPStore client runs one op at a time and holds its
    lock through a blocking get/wait, so two groups rendezvousing at once over one client (the
    epoch group and the heal groups that overlap it) can deadlock across processes -- my wait
    for your key holds my client while your set of the key I wait for queues behind your wait
    for mine -- until the store timeout (reproduced with plain gloo groups). Nor does each
    rendezvous open a connection of its own: with torch 2.13 every 25th TCPStore client a
    process creates takes 5 s to connect (measured here, with either server backend), which
    stalled joins. So a rendezvous borrows an idle client from a small pool and returns it
    when its group exists (a gloo group does not use the store after construction; an NCCL
    group does, at its first collective, so it keeps its client); a
    rendezvous abandoned after an abort keeps its client until it returns, and the next one
    borrows another. The `store()` client is left to short key operations (heal metadata,
    digests).
    """

    def __init__(self, backend: str, timeout: float, device: Any, client: Any) -> None:
        self.backend = backend
        self.timeout = timeout
        self.device = device
        self.client = client
        self._store: Any = None
        self._store_generation = -1
        self._lock = threading.Lock()
        self._idle: list[Any] = []  # rendezvous clients of `_idle_generation`, not in use
        self._idle_generation = -1

    def store(self) -> Any:
        if self._store is None or self._store_generation != self.client.generation:
            self._store = self._connect()
            self._store_generation = self.client.generation
        return self._store

    def _connect(self) -> Any:
        return dist.TCPStore(
            self.client.host,
            self.client.store_port,
            is_master=False,
            timeout=timedelta(seconds=self.timeout),
            wait_for_workers=False,
        )

    def _borrow(self) -> tuple[Any, int]:
        generation = self.client.generation
        with self._lock:
            if self._idle_generation != generation:
                self._idle, self._idle_generation = [], generation
            if self._idle:
                return self._idle.pop(), generation
        return self._connect(), generation

    def _give_back(self, store: Any, generation: int) -> None:
        with self._lock:
            if generation == self._idle_generation == self.client.generation:
                self._idle.append(store)

    def new_group(self, prefix: str, rank: int, size: int) -> Any:
        """A process group of `size` ranks rendezvousing under `prefix` of the store, on a
        store client no other rendezvous is using (see the class docstring)."""
        store, generation = self._borrow()
        # A gloo group is done with the store once built; an NCCL group (and gloo with
        # TORCH_GLOO_LAZY_INIT) uses it again at its first collective, so its client is its own.
        reusable = self.backend == "gloo" and not os.environ.get("TORCH_GLOO_LAZY_INIT")
        try:
            return new_process_group(
                self.backend,
                dist.PrefixStore(prefix, store),
                rank,
                size,
                self.timeout,
                self.client.local_address,
                self.device.index if self.device.type == "cuda" else None,
            )
        finally:
            if reusable:
                self._give_back(store, generation)

    @contextlib.contextmanager
    def _borrowed(self, prefix: str) -> Iterator[Any]:
        """`prefix` of a borrowed store client, given back afterwards (for rendezvous whose
        connections do not use the store once made)."""
        store, generation = self._borrow()
        try:
            yield dist.PrefixStore(prefix, store)
        finally:
            self._give_back(store, generation)

    def ring_sockets(self, prefix: str, rank: int, size: int, abort: AbortSignal) -> RingSockets:
        """Connect the native ring's sockets under `prefix` (blocking)."""
        with self._borrowed(prefix) as store:
            return connect_ring(store, rank, size, ring_host(self.client.local_address), abort, self.timeout)

    def heal_links(
        self, prefix: str, rank: int, sources: list[int], receivers: list[int], abort: AbortSignal
    ) -> dict[int, Any]:
        """Connect this member's heal streams under `prefix` (blocking)."""
        with self._borrowed(prefix) as store:
            host = ring_host(self.client.local_address)
            return connect_heal_links(store, rank, sources, receivers, host, abort, self.timeout)

    def build(self, info: EpochInfo, abort: AbortSignal) -> tuple[Any, str | None]:
        """The epoch's cross-replica group (None for a group of one), or why it failed."""
        if info.world_size == 1:
            return None, None
        pg, err = build_with_abort(
            lambda: self.new_group(info.store_prefix, info.rank, info.world_size), abort, self.timeout
        )
        if pg is None:
            return None, err or "rendezvous failed"
        return pg, None
