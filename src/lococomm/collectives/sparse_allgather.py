"""All-gather of payloads, summed in member order: top-k, SparseLoCo, sign and any codec whose
payloads do not sum in a ring.

Each member encodes its contribution (in pieces for chunked codecs, so encoding piece i + 1
overlaps the all-gather of piece i), all-gathers the payload bytes on the epoch's group (the
sizes depend only on shape and codec configuration, so every member knows them in advance),
and once every piece arrived decodes all members' payloads in rank order into the result:
the same bytes added in the same order on every member, hence bit-identical results.

Pieces: codecs with a `chunk` (TopK(chunk=C), SparseLoCo) select per chunk, so encoding pieces
cut at multiples of C selects exactly what encoding the whole tensor would. A global top-k
(chunk=None) and the others are encoded whole.

Error feedback: err = (x + e) - D(C(x + e)) of this member's own payload (fused for top-k);
the result is exactly the sum of the decoded payloads, so errors add up as feedback.py needs.

Memory: the gathered payloads of every piece (W times the compressed size) until the end.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from lococomm.collectives.call import Call, CallAlgorithm
from lococomm.collectives.stats import Timer
from lococomm.compress.base import Codec, derive_seed
from lococomm.compress.payload import Payload, buffer_bytes

log = logging.getLogger(__name__)

PIECE_ELEMENTS = 1 << 22  # target piece length for chunked codecs (16 MiB of fp32)


def plan_pieces(numel: int, codec: Codec, piece_elements: int = PIECE_ELEMENTS) -> list[tuple[int, int]]:
    """Pieces [a, b) encoded separately (pure): cut at multiples of the codec's chunk."""
    chunk = getattr(codec, "chunk", None)
    if numel == 0:
        return []
    if not chunk:
        return [(0, numel)]
    step = max(1, piece_elements // chunk) * chunk
    return [(a, min(numel, a + step)) for a in range(0, numel, step)]


class SparseAllgather(CallAlgorithm):
    """One all-gather all-reduce call (construct, then `run()`)."""

    def __init__(self, call: Call, codec: Codec) -> None:
        super().__init__(call)
        self.codec = codec
        self._keep: list[torch.Tensor] = []

    def run(self) -> bool:
        comm, w = self.comm, self.comm.world_size
        gathered: list[tuple[int, int, dict[str, Any], torch.Tensor]] = []
        deadline = time.monotonic() + comm.timeout
        try:
            for index, (a, b) in enumerate(plan_pieces(self.x.numel(), self.codec)):
                meta = self.codec.empty_payload((b - a,), torch.float32).to_parts()[0]
                nbytes = buffer_bytes(meta)
                with Timer(self.stats, "encode_seconds"):
                    send = self._encode(a, b, derive_seed(self.seed, index)).to_buffer()
                if send.numel() != nbytes:
                    raise ValueError(f"payload of {send.numel()} bytes, expected {nbytes}")
                out = torch.empty(w * nbytes, dtype=torch.uint8)
                work = comm.pg._allgather_base(out, send)
                self._works.append(work)
                self._keep += [send, out]
                gathered.append((a, b, meta, out))
                self.stats.bytes_sent += nbytes * (w - 1)
                self.stats.bytes_received += nbytes * (w - 1)
            err = comm.wait(self._works, deadline)
            if err is not None:
                return self._fail(err)
        except Exception as e:  # an encode error (non-finite input) or a gloo error on issue
            log.exception("%s: compressed all-gather failed", self.description)
            return self._fail(f"{type(e).__name__}: {e}")
        with Timer(self.stats, "decode_seconds"):
            for a, b, meta, out in gathered:
                nbytes = out.numel() // w
                payloads = [
                    Payload.from_buffer(meta, out[rank * nbytes : (rank + 1) * nbytes])
                    for rank in range(w)
                ]
                # zero, add every member's decoding in rank order, / W (fused for chunked codecs)
                self.codec.decode_sum_(self.result[a:b], payloads, w if self.mean else 1)
        return True

    def _encode(self, a: int, b: int, seed: int) -> Payload:
        piece = self.x[a:b]
        if self.err is None:
            return self.codec.encode(piece, seed)
        if self.state is not None:
            state = self.state[a:b]
        else:
            state = torch.zeros(b - a, dtype=torch.float32, device=piece.device)
        payload, _ = self.codec.encode_feedback(
            piece, state, seed, mode="ef", state_out=self.err[a:b]
        )
        return payload

    def _fail(self, err: str) -> bool:
        self.comm.graveyard.bury(self._works, self._keep)
        self.comm.fail(f"{self.description}: {err}")
        return False
