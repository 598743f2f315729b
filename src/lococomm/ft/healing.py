"""Healing: moving the replicated state from up-to-date members to joiners and laggards.

Protocol (inside one epoch; the coordinator's epoch plan names the sources and receivers,
bystanders take no part):

1. As soon as the epoch's plan arrives -- while the epoch's own group is still rendezvousing
   -- the primary source (lowest rank) publishes `heal/meta` in the epoch's store (the JSON
   skeleton of all non-tensor state, tensor specs, the sources it comes from, chunk size;
   names, shapes and dtypes never travel any other way, and nothing is pickled); every
   source and receiver starts connecting its transport (`HealGroups`), and every receiver
   prepares where the bytes land (`heal_landing.Landing`: targets, fresh memory paged in).
2. The state's bytes are cut into chunks (`plan_chunks`: big tensors split, small ones
   packed); chunk i comes from source i mod len(sources), so a large state is spread over
   the healthy sources.
3. Transport, gloo epochs: TCP streams (`heal_links`, `ops.heal_stream`). One native call
   per member moves every stream at once, each chunk followed by its checksum (64-bit
   multilinear hash, `ops.checksum`) and written straight into the receiver's own tensors;
   nothing writes into them once the call has returned. A small state comes from one source
   (`stream_sources`). A receiver whose transfer broke half-way holds a mix of old and new
   bytes and says so (`Healer.state_damaged`: the manager stops offering it as a source).
4. Transport, NCCL epochs (or LOCOCOMM_HEAL_STREAMS=0): each source broadcasts its chunks in a
   small group of its own ({source} + receivers) and publishes the chunk checksums in the
   store. Receivers land a chunk straight in its tensor when nothing but the state can see
   that tensor's memory (one the state holds exclusively, re-pointed to new memory if the
   transfer is abandoned, or a fresh one); chunks of module parameters (aliases) land in
   bounded staging buffers, hashed while copied into place, because an abandoned gloo/NCCL
   receive may still write later. Broadcasts rather than send/recv: gloo's send/recv report
   completion only through a blocking `wait()`, and a timed-out `wait(timeout)` closes the
   pair, so they cannot be waited on in abort-aware slices; broadcast works can.
5. A receiver loads the state only if every chunk's checksum matches; the first commit of
   the epoch compares full-state blake2b digests across members (bit-parity).

A source that dies mid-transfer ends the epoch (the coordinator sees it); the receiver is still
behind in the next epoch and heals from the remaining sources.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lococomm import ops
from lococomm.collectives.abort import AbortSignal, wait_store_keys
from lococomm.collectives.communicator import Communicator
from lococomm.collectives.ring_sockets import close_quietly
from lococomm.ft.heal_landing import FRESH, OWNED, SHARED, Landing
from lococomm.ft.state import ReplicatedState, TensorSpec

log = logging.getLogger(__name__)

CHUNK_BYTES = 8 << 20
# Chunks of a stream heal are smaller: a chunk's checksum must be complete before its
# trailer goes out or is checked, and with 8 MiB chunks the bytes still to hash had left the
# cache by then (1 GB over one loopback stream: 0.29 s with 8 MiB chunks, 0.22 s with 1 MiB)
STREAM_CHUNK_BYTES = 1 << 20
SPREAD_BYTES = 64 << 20  # state bytes per source a stream heal is spread over (stream_sources)
WINDOW = 4  # chunks in flight per source (and per receiver in total, times 2)
LINKS = "links"  # HealGroups' key for the stream transport's {peer rank: socket}
STREAM_MAGIC = 0x4C43_4845_414C_0001  # first header word of a heal stream ("LCHEAL", version 1)


@dataclass(frozen=True)
class Segment:
    tensor: int
    start: int  # byte offsets within the tensor
    end: int


def plan_chunks(specs: list[TensorSpec], chunk_bytes: int = CHUNK_BYTES) -> list[list[Segment]]:
    """Cut the state's bytes into chunks of <= chunk_bytes (pure: same on every member).

    Tensors of at least chunk_bytes / 4 get chunks of their own (a receiver can land those
    straight in the tensor); smaller ones are packed together."""
    chunks: list[list[Segment]] = []
    current: list[Segment] = []
    size = 0
    for index, spec in enumerate(specs):
        nbytes = spec.nbytes
        if nbytes == 0:
            continue
        if nbytes >= chunk_bytes // 4:
            for start in range(0, nbytes, chunk_bytes):
                chunks.append([Segment(index, start, min(nbytes, start + chunk_bytes))])
            continue
        if size + nbytes > chunk_bytes:
            chunks.append(current)
            current, size = [], 0
        current.append(Segment(index, 0, nbytes))
        size += nbytes
    if current:
        chunks.append(current)
    return chunks


def chunk_size_for(state_bytes: int, max_chunk_bytes: int = CHUNK_BYTES) -> int:
    """Chunk size for a state: max_chunk_bytes for large states, smaller (down to 1 MiB) for
    small ones so that even they are cut into ~16 chunks that pipeline (the next chunk travels
    while the last one is hashed) and spread over every source."""
    size = min(max_chunk_bytes, max(1 << 20, state_bytes // 16))
    return max(4096, size // 4096 * 4096)


def source_chunks(count: int, sources: list[int], rank: int) -> list[int]:
    """The indices of `count` chunks that source `rank` sends: chunk i comes from source
    i mod len(sources), so a large state is spread over every source named."""
    return [i for i in range(count) if sources[i % len(sources)] == rank]


def chunk_nbytes(chunk: list[Segment]) -> int:
    return sum(s.end - s.start for s in chunk)


def stream_sources(
    sources: list[int], state_bytes: int, hosts: dict[int, str] | None = None, spread_bytes: int = SPREAD_BYTES
) -> list[int]:
    """The sources a state of `state_bytes` streams from (TCP streams): one per `spread_bytes`
    of state, at least one, each on a host of its own (`hosts`: rank -> host; unknown or ""
    counts as a host of its own), the lowest ranks first.

    A small state comes from one source: every further one is another process that must be
    scheduled at the same moment (on a loaded machine they start milliseconds apart, longer
    than a 10 MB transfer takes). A large one is spread over hosts, so no single uplink limits
    the heal; two sources on one host share its cores and NIC and gain nothing (measured here,
    1 GB over loopback: one source 0.22-0.24 s, two on the same host 0.28-0.31 s)."""
    wanted = max(1, -(-state_bytes // spread_bytes))
    hosts = hosts or {}
    chosen: list[int] = []
    seen: set[str] = set()
    for rank in sorted(sources):
        host = hosts.get(rank, "")
        if host and host in seen:
            continue
        seen.add(host)
        chosen.append(rank)
        if len(chosen) == wanted:
            break
    return chosen


def publish_meta(store: Any, snapshot: Any, sources: list[int], max_chunk_bytes: int = CHUNK_BYTES) -> dict:
    """The primary source's `heal/meta`: the JSON skeleton (all non-tensor state), tensor
    specs, the ranks it comes from and chunk size; then `heal/sources` (those ranks alone, for
    the link rendezvous). Published as soon as the epoch's plan is known (before any process
    group exists), so receivers find it when their groups are ready."""
    meta = {
        "skeleton": snapshot.skeleton,
        "specs": [s.to_json() for s in snapshot.specs],
        "sources": sorted(sources),
        "chunk_bytes": chunk_size_for(snapshot.nbytes, max_chunk_bytes),
    }
    text = json.dumps(meta)  # a non-JSON value in the state raises here, to the caller
    try:
        store.set("heal/meta", text)
        store.set("heal/sources", json.dumps(meta["sources"]))
    except (RuntimeError, OSError) as e:  # the store (coordinator) went away
        raise HealError(f"could not publish the heal metadata: {e}") from e
    return meta


class HealError(RuntimeError):
    """The transfer failed (peer gone, abort, timeout, or a digest mismatch)."""


def _root_zero() -> Any:
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    return opts


def _byte_view(tensor: torch.Tensor) -> torch.Tensor:
    t = tensor.detach()
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return t.contiguous().reshape(-1).view(torch.uint8)


def wait_key(store: Any, key: str | list[str], abort: AbortSignal, deadline: float) -> None:
    """`abort.wait_store_keys`, raising HealError when it gives up."""
    err = wait_store_keys(store, [key] if isinstance(key, str) else list(key), abort, deadline)
    if err is not None:
        raise HealError(err)


def mark_landed(store: Any, rank: int) -> None:
    """Tell the members that `wait_landed` that receiver `rank`'s state is in. HealError if the
    store is gone: the others would otherwise wait out their timeout (the heal is redone)."""
    try:
        store.set(f"heal/landed/{rank}", "1")
    except Exception as e:
        raise HealError(f"could not tell the others that this state landed: {e}") from e


def wait_landed(store: Any, receivers: list[int], abort: AbortSignal, timeout: float) -> str | None:
    """Wait until every receiver of a heal has its state in (`mark_landed`); None, or why it
    stopped (abort, `timeout` seconds, store gone). For the members that were not healed: the
    first commit after a heal hashes the whole state (blake2b, ~1 s per GB on one core), and
    started while the transfer still runs, that hash takes the CPU the transfer needs (a 1 GB
    heal from one source, the other up-to-date member hashing meanwhile: 0.50-0.54 s, vs
    0.30-0.36 s when it waits). The receivers hash after landing too: no decision is delayed."""
    keys = [f"heal/landed/{r}" for r in receivers]
    return wait_store_keys(store, keys, abort, time.monotonic() + timeout)


def chunk_digest(data: torch.Tensor) -> str:
    """64-bit multilinear checksum and length of one chunk's bytes: a transfer-integrity check
    (`ops.checksum`, position-dependent; per 8 MiB chunk here 0.4 ms in C++, 0.6 ms in torch,
    vs 1.6 ms for zlib.crc32 and ~8 ms for blake2b); the full-state blake2b digests are
    compared at the first commit."""
    return f"{ops.checksum(data):016x}:{data.numel()}"


def chunk_digest_copy(staged: torch.Tensor, pieces: list[tuple[torch.Tensor, int]]) -> str:
    """`chunk_digest(staged)` while copying staged[offset : offset + len(dst)] into each dst of
    `pieces`: a chunk that is one piece of a tensor is copied and hashed in one pass
    (`ops.checksum_copy`); a packed chunk of small tensors is copied, then hashed."""
    if len(pieces) == 1 and pieces[0][0].numel() == staged.numel():
        return f"{ops.checksum_copy(pieces[0][0], staged):016x}:{staged.numel()}"
    for dst, offset in pieces:
        dst.copy_(staged[offset : offset + dst.numel()])
    return chunk_digest(staged)


def streams_enabled(backend: str) -> bool:
    """Whether heals of an epoch on `backend` stream over TCP (`ops.heal_stream`): on gloo
    unless LOCOCOMM_HEAL_STREAMS=0 (which must then be set on every member). NCCL epochs
    broadcast in per-source groups, device to device."""
    return backend == "gloo" and os.environ.get("LOCOCOMM_HEAL_STREAMS", "1") != "0"


def layout_hash(meta: dict) -> int:
    """A signed 64-bit hash of what a heal's streams carry: specs, chunk size, sources."""
    layout = json.dumps([meta["specs"], meta["chunk_bytes"], meta["sources"]], sort_keys=True)
    return int.from_bytes(hashlib.blake2b(layout.encode(), digest_size=8).digest(), "little", signed=True)


def stream_header(layout: int, stream: int, chunks: int, nbytes: int) -> torch.Tensor:
    """The 40-byte header opening the heal stream of the `stream`-th source (magic, stream,
    chunk count, byte count, `layout_hash`). A receiver reads no data from a stream whose
    header differs from the one it computes itself."""
    words = [STREAM_MAGIC, stream, chunks, nbytes, layout]
    return torch.tensor(words, dtype=torch.int64).view(torch.uint8)


class Background:
    """A function run on a helper thread (CPU work done while the epoch group forms);
    `result()` waits for it and returns its value or raises its exception."""

    def __init__(self, fn: Callable[[], Any], name: str) -> None:
        self._done = threading.Event()
        self._value: Any = None
        self._error: BaseException | None = None
        self._fn = fn
        threading.Thread(target=self._run, daemon=True, name=name).start()

    def _run(self) -> None:
        try:
            self._value = self._fn()
        except BaseException as e:  # handed to result()
            self._error = e
        finally:
            self._fn = None  # type: ignore[assignment]
            self._done.set()

    def result(self) -> Any:
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value


@dataclass
class SendPlan:
    """What a source's `ops.heal_stream` call sends: its chunks' pieces (byte views of the
    state's tensors), the piece index ending each chunk, the stream header."""

    pieces: list[torch.Tensor]
    ends: list[int]
    header: torch.Tensor
    chunks: int  # this source's chunks
    nbytes: int  # this source's bytes (per receiver)


@dataclass
class ReceivePlan:
    """What a receiver's `ops.heal_stream` call fills, one stream per source: pieces (byte views
    of the landing tensors), chunk ends, expected headers; `landing` are the targets (bool as
    uint8), `host` where each lands first (itself, or a CPU buffer for a device tensor)."""

    landing: list[torch.Tensor]
    host: list[torch.Tensor]
    pieces: list[list[torch.Tensor]]
    ends: list[list[int]]
    headers: list[torch.Tensor]


def send_plan(snapshot: Any, meta: dict, rank: int) -> SendPlan:
    """Source `rank`'s stream of a heal: chunk i of `plan_chunks` comes from source
    i mod len(sources), straight from the snapshot's tensors (a device tensor is copied to the
    host first: the streams are TCP)."""
    sources = meta["sources"]
    chunks = plan_chunks(snapshot.specs, meta["chunk_bytes"])
    mine = source_chunks(len(chunks), sources, rank)
    views = [
        _byte_view(t if t.device.type == "cpu" else t.cpu()) if s.nbytes else None
        for s, t in zip(snapshot.specs, snapshot.tensors)
    ]
    pieces: list[torch.Tensor] = []
    ends: list[int] = []
    for index in mine:
        pieces.extend(views[seg.tensor][seg.start : seg.end] for seg in chunks[index])  # type: ignore[index]
        ends.append(len(pieces))
    nbytes = sum(p.numel() for p in pieces)
    header = stream_header(layout_hash(meta), sources.index(rank), len(mine), nbytes)
    return SendPlan(pieces, ends, header, len(mine), nbytes)


def receive_plan(meta: dict, specs: list[TensorSpec], targets: list[torch.Tensor]) -> ReceivePlan:
    """A receiver's streams of a heal into `targets` (one per spec), matching every source's
    `send_plan`."""
    sources = meta["sources"]
    chunks = plan_chunks(specs, meta["chunk_bytes"])
    # bool tensors travel as uint8 (one byte each); tensors on a device land on the host
    # (the streams are TCP) and are copied over once complete.
    landing = [t.view(torch.uint8) if t.dtype == torch.bool else t for t in targets]
    host = [t if t.device.type == "cpu" else torch.empty(t.shape, dtype=t.dtype) for t in landing]
    views = [t.detach().reshape(-1).view(torch.uint8) for t in host]
    pieces: list[list[torch.Tensor]] = [[] for _ in sources]
    ends: list[list[int]] = [[] for _ in sources]
    for index, chunk in enumerate(chunks):
        k = index % len(sources)
        pieces[k].extend(views[seg.tensor][seg.start : seg.end] for seg in chunk)
        ends[k].append(len(pieces[k]))
    layout = layout_hash(meta)
    headers = [
        stream_header(layout, k, len(ends[k]), sum(p.numel() for p in pieces[k])) for k in range(len(sources))
    ]
    return ReceivePlan(landing, host, pieces, ends, headers)


def _name_stream(err: str, peers: list[int]) -> str:
    """`ops.heal_stream`'s "stream i: why" with the stream named by its peer: "rank r: why"."""
    head, sep, rest = err.partition(": ")
    if sep and head.startswith("stream ") and head[7:].isdigit() and int(head[7:]) < len(peers):
        return f"rank {peers[int(head[7:])]}: {rest}"
    return err


GroupFactory = Callable[[str, int, int], Any]  # (store suffix, rank, size) -> process group


class HealGroups:
    """The heal's transport, connected on a helper thread from the moment the epoch's plan is
    known, concurrently with the epoch's own group: TCP links for the state streams
    (`make_links`, gloo epochs), or process groups ({source} + receivers, one per source) for
    broadcasts (NCCL epochs, or LOCOCOMM_HEAL_STREAMS=0).

    Each rendezvous takes 1-4 ms on loopback; built after the epoch group they sat in series on
    a joiner's critical path. With groups, a source joins its own group; a receiver joins one
    per source, one after the other in source order (every member uses the same order, and each
    rendezvous borrows a store client of its own: see EpochGroups); a bystander none. What is
    connected after `retire` (the epoch was given up) is closed (links) or goes straight to the
    graveyard's reaper (groups)."""

    def __init__(
        self,
        rank: int,
        sources: list[int],
        receivers: list[int],
        make_group: GroupFactory,
        abort: AbortSignal,
        make_links: Callable[[], dict[int, Any]] | None = None,
    ) -> None:
        sources, receivers = sorted(sources), sorted(receivers)
        size = 1 + len(receivers)
        self.streams = make_links is not None
        self.wanted: dict[str, tuple[int, int]] = {}
        if self.streams and (rank in sources or rank in receivers):
            self.wanted[LINKS] = (rank, 0)
        elif rank in sources:
            self.wanted[f"heal/{rank}"] = (0, size)
        elif rank in receivers:
            mine = 1 + receivers.index(rank)
            self.wanted = {f"heal/{s}": (mine, size) for s in sources}
        self._abort = abort
        self._lock = threading.Lock()
        self._results: dict[str, Any] = {}
        self._errors: list[str] = []
        self._graveyard: Any = None  # set by retire()
        if self.wanted:
            threading.Thread(
                target=self._build_all, args=(make_group, make_links), daemon=True, name="lococomm-heal-groups"
            ).start()

    def _build_all(self, make_group: GroupFactory, make_links: Callable[[], dict[int, Any]] | None) -> None:
        # One after the other, in source order (the same on every member, so no two members
        # can wait on each other's later group), rather than one thread per group.
        for suffix, (rank, size) in self.wanted.items():
            if self._graveyard is not None:  # given up: do not start further rendezvous
                break
            if make_links is not None:
                self._build(suffix, make_links)
            else:
                self._build(suffix, functools.partial(make_group, suffix, rank, size))

    def _build(self, suffix: str, make: Callable[[], Any]) -> None:
        started = time.monotonic()
        try:
            built = make()
            log.debug("heal %s ready in %.1f ms", suffix, (time.monotonic() - started) * 1e3)
        except BaseException as e:
            with self._lock:
                self._errors.append(f"{suffix}: {e}")
        else:
            with self._lock:
                late = self._graveyard
                if late is None:
                    self._results[suffix] = built
            if late is not None:  # the heal was given up while this rendezvoused
                self._discard([built], late)
            del built
        self._abort.notify()

    def wait(self, deadline: float) -> dict[str, Any]:
        """Every group of this member (or its links, under LINKS: {peer rank: socket}), or
        HealError (rendezvous failed, abort, timeout)."""
        err = self._abort.wait_until(
            lambda: len(self._results) + len(self._errors) == len(self.wanted), deadline
        )
        if err is not None:
            raise HealError(f"heal rendezvous {err}")
        if self._errors:
            raise HealError(f"heal rendezvous failed: {self._errors[0]}")
        return dict(self._results)

    def retire(self, graveyard: Any) -> None:
        """Close the links, or hand every group built so far, and any that finishes later, to
        `graveyard`."""
        with self._lock:
            self._graveyard = graveyard
            built = list(self._results.values())
            self._results.clear()
        self._discard(built, graveyard)

    def _discard(self, built: list[Any], graveyard: Any) -> None:
        if self.streams:
            for links in built:
                for sock in links.values():
                    close_quietly(sock)
        else:
            graveyard.retire_groups(built)


class Healer:
    """Runs one epoch's heal for this member (source, receiver or bystander)."""

    def __init__(
        self,
        comm: Communicator,
        store: Any,
        state: ReplicatedState,
        sources: list[int],
        receivers: list[int],
        groups: HealGroups,
        published: tuple[Any, dict] | None = None,
        landing: Landing | None = None,
        prepared_send: Background | None = None,
    ) -> None:
        self.comm = comm
        self.store = store
        self.state = state
        self.sources = sorted(sources)
        self.receivers = sorted(receivers)
        self.groups = groups
        self.published = published  # (snapshot, meta): the primary source published up front
        self.landing = landing  # a receiver's metadata and targets, prepared up front
        self.prepared_send = prepared_send  # the primary source's SendPlan, prepared up front
        self.deadline = time.monotonic() + comm.timeout
        self.bytes_moved = 0
        self.phases: dict[str, float] = {}
        # True while (and if, after a failure) this receiver's live tensors hold a partial
        # transfer: its state is then not to be offered as anyone's source
        self.state_damaged = False

    def run(self) -> None:
        rank = self.comm.rank
        try:
            if rank in self.sources:
                self._as_source()
            elif rank in self.receivers:
                self._as_receiver()
                mark_landed(self.store, rank)
                if self.landing is not None:  # off the critical path, as far as it overlapped
                    self.phases["prepare_ms"] = self.landing.seconds * 1e3
                    self.phases["populated_ms"] = self.landing.populate_seconds * 1e3
        finally:
            if self.landing is not None:
                self.landing.finished = True
            self.groups.retire(self.comm.graveyard)

    # ------------------------------------------------------------------ source side
    def _as_source(self) -> None:
        rank = self.comm.rank
        if self.published is not None:
            snapshot, meta = self.published
        elif rank == self.sources[0]:
            raise HealError("the primary source must publish the heal metadata first (publish_meta)")
        else:
            snapshot = self.state.snapshot()
            wait_key(self.store, "heal/meta", self.comm.abort, self.deadline)
            meta = json.loads(self.store.get("heal/meta"))
        if self.published is None and [s.to_json() for s in snapshot.specs] != meta["specs"]:
            raise HealError("this source's tensor layout differs from the primary source's")
        sources = meta["sources"]
        if rank not in sources:  # up to date, but not needed this time (stream_sources)
            return
        if self.groups.streams:
            # the primary source's plan was built while the epoch group formed
            plan = self.prepared_send.result() if self.prepared_send else send_plan(snapshot, meta, rank)
            self.prepared_send = None  # (a device state's plan holds a host copy of it)
            self._send_streams(plan)
            return
        chunks = plan_chunks(snapshot.specs, meta["chunk_bytes"])
        mine = source_chunks(len(chunks), sources, rank)
        group = self.groups.wait(self.deadline)[f"heal/{rank}"]
        log.info(
            "heal: sending %d of %d chunks (%d bytes of state) to ranks %s",
            len(mine),
            len(chunks),
            snapshot.nbytes,
            self.receivers,
        )
        views = [_byte_view(t) if s.nbytes else None for s, t in zip(snapshot.specs, snapshot.tensors)]
        opts = _root_zero()
        digests: dict[str, str] = {}
        in_flight: list[tuple[Any, torch.Tensor]] = []
        for index in mine:
            chunk = chunks[index]
            if len(chunk) == 1:
                seg = chunk[0]
                data = views[seg.tensor][seg.start : seg.end]  # type: ignore[index]
            else:  # small tensors packed into one message
                data = torch.cat([views[s.tensor][s.start : s.end] for s in chunk])  # type: ignore[index]
            data = self._on_comm_device(data)
            work = group.broadcast([data], opts)
            in_flight.append((work, data))
            digests[str(index)] = chunk_digest(data)  # overlaps the transfer (read-only)
            self.bytes_moved += data.numel() * len(self.receivers)
            if len(in_flight) >= WINDOW:
                self._wait([in_flight.pop(0)], pending=in_flight)
        # Every digest is known once the last chunk is hashed: publish before the last waits
        # so the receiver finds them as soon as its data is in (if the transfer fails, the
        # receiver's own wait fails too and the digests are never used).
        self.store.set(f"heal/chunks/{rank}", json.dumps(digests))
        self._wait(in_flight)

    # ------------------------------------------------------------------ receiver side
    def _as_receiver(self) -> None:
        t0 = time.monotonic()
        if self.landing is None:  # (the manager starts it while the epoch group forms)
            timeout = max(0.0, self.deadline - t0)
            self.landing = Landing(self.store, self.state, self.comm.device, self.comm.abort, timeout)
        try:
            meta, specs, targets, kinds = self.landing.wait(self.deadline)
        except RuntimeError as e:
            raise HealError(str(e)) from e
        sources = meta["sources"]
        if not sources:
            raise HealError("no source to heal from")
        # streams may come from a subset of the epoch's sources (stream_sources); broadcasts
        # come from all of them
        if not set(sources) <= set(self.sources) or (sources != self.sources and not self.groups.streams):
            raise HealError(f"the primary source names sources {sources}, the epoch plan {self.sources}")
        t1 = time.monotonic()
        groups = self.groups.wait(self.deadline)
        t2 = time.monotonic()
        if self.groups.streams:
            self._receive_streams(meta, specs, targets, kinds, groups[LINKS], (t0, t1, t2))
            return
        chunks = plan_chunks(specs, meta["chunk_bytes"])
        # (the broadcasts' staging and checksum exchange below; streams need neither)
        # bool tensors travel as uint8 (one byte each) and are converted after the transfer.
        landing = [t.view(torch.uint8) if t.dtype == torch.bool else t for t in targets]
        views = [t.detach().reshape(-1).view(torch.uint8) for t in landing]
        # A chunk that is one piece of a fresh or an owned tensor is received straight into it;
        # everything else lands in a private staging buffer first (see heal_landing.choose_targets).
        direct = [
            len(chunk) == 1 and kinds[chunk[0].tensor] != SHARED
            and landing[chunk[0].tensor].device == self.comm.device
            for chunk in chunks
        ]  # fmt: skip
        # Bounded memory: at most 2 * WINDOW chunks in flight and as many staging buffers,
        # however many sources there are.
        window = min(2 * WINDOW, max(1, len(chunks)))
        staging = [
            torch.empty(meta["chunk_bytes"], dtype=torch.uint8, device=self.comm.device)
            for _ in range(min(window, sum(not d for d in direct)))
        ]
        opts = _root_zero()
        free = list(range(len(staging)))
        received: dict[str, str] = {}
        in_flight: list[tuple[Any, int, int, torch.Tensor]] = []  # (work, chunk, slot or -1, buffer)
        next_chunk = 0
        try:
            while next_chunk < len(chunks) or in_flight:
                while len(in_flight) < window and next_chunk < len(chunks):
                    if direct[next_chunk]:
                        seg = chunks[next_chunk][0]
                        slot, buf = -1, views[seg.tensor][seg.start : seg.end]
                    elif free:
                        slot = free.pop()
                        buf = staging[slot][: chunk_nbytes(chunks[next_chunk])]
                    else:
                        break
                    group = groups[f"heal/{sources[next_chunk % len(sources)]}"]
                    in_flight.append((group.broadcast([buf], opts), next_chunk, slot, buf))
                    next_chunk += 1
                work, index, slot, buf = in_flight.pop(0)
                self._wait([(work, buf)], pending=[(w, b) for w, _, _, b in in_flight])
                if slot < 0:
                    received[str(index)] = chunk_digest(buf)
                    self.bytes_moved += buf.numel()
                    continue
                offset = 0
                pieces = []
                for seg in chunks[index]:
                    pieces.append((views[seg.tensor][seg.start : seg.end], offset))
                    offset += seg.end - seg.start
                received[str(index)] = chunk_digest_copy(buf, pieces)
                self.bytes_moved += offset
                free.append(slot)
        except BaseException:
            # Ops still in flight keep their buffers (and so the storage of any owned tensor
            # they view) alive in the graveyard; _wait has already buried them if it failed.
            self.comm.graveyard.bury([w for w, _, _, _ in in_flight], [b for _, _, _, b in in_flight])
            # owned tensors a receive was posted into
            exposed = {chunks[i][0].tensor for i in range(next_chunk) if direct[i]}
            self._repoint([targets[t] for t in sorted(exposed) if kinds[t] == OWNED])
            raise
        t3 = time.monotonic()
        expected: dict[str, str] = {}
        keys = [f"heal/chunks/{source}" for source in sources]
        wait_key(self.store, keys, self.comm.abort, self.deadline)
        for value in self.store.multi_get(keys):
            expected.update(json.loads(value))
        bad = sorted(int(i) for i in expected if received.get(i) != expected[i])
        if bad or len(expected) != len(chunks):
            raise HealError(f"state chunks {bad[:8]} arrived corrupted (digest mismatch)")
        t4 = time.monotonic()
        targets = [t.view(torch.bool) if s.dtype == "bool" else t for s, t in zip(specs, landing)]
        self.state.load(meta["skeleton"], targets)
        self.phases = {
            "meta_ms": (t1 - t0) * 1e3,
            "groups_ms": (t2 - t1) * 1e3,
            "transfer_ms": (t3 - t2) * 1e3,
            "verify_ms": (t4 - t3) * 1e3,
            "load_ms": (time.monotonic() - t4) * 1e3,
        }
        log.info("heal phases (ms): %s", {k: round(v, 1) for k, v in self.phases.items()})

    # ------------------------------------------------------------------ TCP streams
    def _send_streams(self, plan: SendPlan) -> None:
        """Stream this source's chunks to every receiver at once (`ops.heal_stream`), straight
        from the state's tensors, each chunk followed by its checksum."""
        links = self.groups.wait(self.deadline)[LINKS]
        receivers = sorted(links)
        n = len(receivers)
        started = time.monotonic()
        err = ops.heal_stream(
            [links[r].fileno() for r in receivers],
            [plan.pieces] * n,
            [plan.ends] * n,
            [plan.header] * n,
            True,
            self.comm.abort.fileno(),
            max(0.0, self.deadline - time.monotonic()),
        )
        if err:
            raise HealError(f"sending the state failed: {_name_stream(err, receivers)}")
        self.bytes_moved += plan.nbytes * n
        # (logged after the transfer: formatting a record before it costs ~0.2 ms of the heal)
        log.info(
            "heal: sent %d chunks (%d bytes) to ranks %s over TCP streams in %.1f ms",
            plan.chunks,
            plan.nbytes,
            receivers,
            (time.monotonic() - started) * 1e3,
        )

    def _receive_streams(
        self,
        meta: dict,
        specs: list[TensorSpec],
        targets: list[torch.Tensor],
        kinds: list[str],
        links: dict[int, Any],
        times: tuple[float, float, float],
    ) -> None:
        """Receive every source's stream at once straight into the state's tensors (or fresh
        ones), checking each chunk's checksum as it completes; then load."""
        sources = meta["sources"]
        assert self.landing is not None  # (_as_receiver makes one if the manager did not)
        plan = self.landing.prepared
        if not isinstance(plan, ReceivePlan):  # (a Landing made without receive_plan)
            plan = receive_plan(meta, specs, targets)
        landing, host, pieces, ends, headers = plan.landing, plan.host, plan.pieces, plan.ends, plan.headers
        # The bytes land in the live tensors: a transfer that fails half-way leaves this
        # member's state a mix of old and new (the manager stops offering it as a source).
        self.state_damaged = any(
            kind != FRESH and host[i] is landing[i] for i, kind in enumerate(kinds)
        )
        err = ops.heal_stream(
            [links[s].fileno() for s in sources],
            pieces,
            ends,
            headers,
            False,
            self.comm.abort.fileno(),
            max(0.0, self.deadline - time.monotonic()),
        )
        if err:
            raise HealError(f"receiving the state failed: {_name_stream(err, sources)}")
        self.state_damaged = False
        self.bytes_moved += sum(p.numel() for stream in pieces for p in stream)
        t3 = time.monotonic()
        with torch.no_grad():
            for h, t in zip(host, landing):
                if h is not t:
                    t.copy_(h)
        targets = [t.view(torch.bool) if s.dtype == "bool" else t for s, t in zip(specs, landing)]
        self.state.load(meta["skeleton"], targets)
        t0, t1, t2 = times
        self.phases = {
            "meta_ms": (t1 - t0) * 1e3,
            "links_ms": (t2 - t1) * 1e3,
            "transfer_ms": (t3 - t2) * 1e3,  # checksums are checked as the chunks arrive
            "load_ms": (time.monotonic() - t3) * 1e3,
        }
        log.info("heal phases (ms): %s", {k: round(v, 1) for k, v in self.phases.items()})

    # ------------------------------------------------------------------ helpers
    def _repoint(self, tensors: list[torch.Tensor]) -> None:
        """Move owned tensors that an abandoned receive may still write into onto new storage
        (their contents were being replaced anyway; the heal is retried in the next epoch).
        The old storage stays alive through the buried receive buffers that view it."""
        with torch.no_grad():
            for t in tensors:
                fresh = torch.empty(t.shape, dtype=t.dtype, device=t.device)
                t.set_(fresh.untyped_storage(), 0, t.shape, t.stride())
        if tensors:
            self.state_damaged = True
            log.info("heal abandoned: re-pointed %d owned tensor(s) to new memory", len(tensors))

    def _on_comm_device(self, data: torch.Tensor) -> torch.Tensor:
        if data.device != self.comm.device:
            return data.to(self.comm.device)
        return data

    def _wait(self, items: list[tuple[Any, torch.Tensor]], pending: list | None = None) -> None:
        """Wait for heal works; on failure bury them (and any still in flight) with buffers."""
        err = self.comm.wait([w for w, _ in items], self.deadline)
        if err is not None:
            # Abandoned sends/receives may still touch their buffers: keep them alive.
            everything = items + (pending or [])
            self.comm.graveyard.bury([w for w, _ in everything], [b for _, b in everything])
            raise HealError(err)

