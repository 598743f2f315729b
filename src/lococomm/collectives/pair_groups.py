"""The ring's links: one two-member process group per neighbour pair, built once per epoch.

Link i joins member i (rank 0, the sender) and member i + 1 mod W (rank 1, the receiver); a
ring hop is a broadcast from rank 0 in that link's group. Why broadcasts in pair groups:

* gloo send/recv works can only be waited with a blocking wait(), and a timed-out
  wait(timeout) closes the pair, so a hop built on them could not be abandoned on an abort;
  broadcast works support the sliced waits of `Communicator.wait`.
* measured here (2 members, loopback): 8 MiB each way in 4 chunks takes 5-10 ms as pair
  broadcasts versus 14-17 ms as an all-gather on the epoch group (which also sends every
  chunk to every member, W - 1 times the ring's traffic at W > 2).
* building the two groups a member belongs to costs 2-13 ms on loopback, once per epoch.

Groups are built one after the other in ascending link order on a helper thread
(`build_with_abort`); the ascending order cannot deadlock (link i waits only for links below
it). An abort stops the wait at once; a build
given up keeps running in the background until its own timeout and its result is dropped.

The groups of an epoch live as long as its communicator (they are referenced from a side
table that forgets them when the communicator is garbage collected); an operation abandoned in
them is kept alive, with its group, by the graveyard (the caller buries the group with it).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lococomm.collectives.abort import build_with_abort
from lococomm.collectives.communicator import Communicator

MakeGroup = Callable[[str, int, int], Any]  # (store suffix, rank, size) -> process group


@dataclass
class Links:
    """This member's two ring links: `right` (it sends, rank 0), `left` (it receives, rank 1)."""

    right: Any
    left: Any

    def groups(self) -> list[Any]:
        return [self.right, self.left]


_LINKS: dict[int, Links] = {}


def ring_links(comm: Communicator, make_group: MakeGroup | None) -> tuple[Links | None, str | None]:
    """The epoch's ring links for this member, built on first use; (links, None) or (None, why)."""
    key = id(comm)
    links = _LINKS.get(key)
    if links is not None:
        return links, None
    if make_group is None:
        return None, "compressed ring needs a process-group factory (use manager.allreduce)"
    w, r = comm.world_size, comm.rank
    left_link = (r - 1) % w

    def build() -> Links:
        built: dict[str, Any] = {}
        for link in sorted({r, left_link}):
            if link == r:
                built["right"] = make_group(f"ring/{link}", 0, 2)
            if link == left_link:
                built["left"] = make_group(f"ring/{link}", 1, 2)
        return Links(right=built["right"], left=built["left"])

    links, err = build_with_abort(build, comm.abort, comm.timeout, what="ring links")
    if links is None:
        return None, err
    _LINKS[key] = links
    weakref.finalize(comm, _LINKS.pop, key, None)
    return links, None
