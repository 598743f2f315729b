"""The ring schedule of a compressed all-reduce, as pure functions (same on every member).

A flat tensor of `numel` elements is cut into `world` segments at multiples of the codec's
alignment (its block size), and every segment into `chunks` pipeline chunks. Member r owns
segment (r + 1) mod W: it finalises that segment's sum.

Messages travel only to the right neighbour. A message is (chunk j, stage s) with
s in [0, 2W - 2); at stage s member r sends segment (r - s) mod W and receives segment
(r - 1 - s) mod W from its left neighbour:

* s = 0: r encodes its own contribution to the segment;
* 1 <= s <= W - 2: r decodes what it received, adds its contribution in fp32, re-encodes;
* s = W - 1: same, and the result is the owner's final encoding of its segment;
* s >= W: r forwards final bytes it received (the all-gather half of the ring).

Messages are issued in the order of (j + s, s): a wavefront, so chunk j + 1 starts its first
hop while chunk j is on its second. Every send of (j, s) depends only on the receive of
(j, s - 1), which comes earlier in that order, so the schedule cannot deadlock, and both ends
of a link issue their operations in the same order (gloo matches operations of a process group
by issue order: a different order would pair buffers of different sizes and kill the process).
Empty chunks (tensors smaller than W blocks) are skipped by both ends alike.
"""

from __future__ import annotations

from dataclasses import dataclass


def split_units(units: int, parts: int) -> list[tuple[int, int]]:
    """Split [0, units) into `parts` contiguous ranges, sizes differing by at most one."""
    base, extra = divmod(units, parts)
    out, start = [], 0
    for i in range(parts):
        end = start + base + (1 if i < extra else 0)
        out.append((start, end))
        start = end
    return out


@dataclass(frozen=True)
class RingPlan:
    """Segments and pipeline chunks of one ring all-reduce (element offsets, end exclusive)."""

    numel: int
    world: int
    align: int
    chunks: tuple[tuple[tuple[int, int], ...], ...]  # chunks[c][j] = (start, end) of segment c

    @property
    def num_chunks(self) -> int:
        return len(self.chunks[0]) if self.chunks else 0

    def bounds(self, segment: int, chunk: int) -> tuple[int, int]:
        return self.chunks[segment][chunk]

    def owned_segment(self, rank: int) -> int:
        return (rank + 1) % self.world

    def sent_segment(self, rank: int, stage: int) -> int:
        return (rank - stage) % self.world

    def received_segment(self, rank: int, stage: int) -> int:
        return (rank - 1 - stage) % self.world

    def order(self) -> list[tuple[int, int]]:
        """All messages (chunk, stage) in issue order (see the module docstring)."""
        stages = 2 * self.world - 2
        msgs = [(j, s) for j in range(self.num_chunks) for s in range(stages)]
        return sorted(msgs, key=lambda m: (m[0] + m[1], m[1]))


def plan_ring(numel: int, world: int, align: int, chunk_elements: int) -> RingPlan:
    """Cut `numel` elements into `world` aligned segments of equal chunk counts (pure).

    chunk_elements is the target chunk length (elements); chunks are multiples of `align`
    except at the tensor's end.
    """
    if world < 1 or align < 1 or chunk_elements < 1:
        raise ValueError(f"bad ring plan: world={world} align={align} chunk={chunk_elements}")
    units = -(-numel // align)
    seg_units = split_units(units, world)
    longest = max(b - a for a, b in seg_units)
    per_chunk = max(1, chunk_elements // align)
    count = max(1, -(-longest // per_chunk))
    chunks = []
    for a, b in seg_units:
        parts = split_units(b - a, count)
        chunks.append(
            tuple(
                (min(numel, (a + lo) * align), min(numel, (a + hi) * align)) for lo, hi in parts
            )
        )
    return RingPlan(numel, world, align, tuple(chunks))


def ring_bytes(numel: int, element_size: int, world: int) -> int:
    """Bytes one member sends in a ring all-reduce of `numel` elements: 2 (W-1)/W of them."""
    return 2 * (world - 1) * numel * element_size // world
