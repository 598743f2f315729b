"""What one compressed all-reduce call works on, shared by every algorithm module."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lococomm.collectives.communicator import Communicator
from lococomm.collectives.stats import CallStats


@dataclass(frozen=True)
class Call:
    """The inputs of one compressed all-reduce call (compressed.py builds it)."""

    comm: Communicator
    x: torch.Tensor  # flat contribution (any float dtype, contiguous)
    result: torch.Tensor  # flat fp32, written only after every message arrived
    mean: bool
    seed: int
    stats: CallStats
    description: str
    state: torch.Tensor | None = None  # classic EF residual added before encoding, or None
    err: torch.Tensor | None = None  # receives this member's encoding errors, or None


class CallAlgorithm:
    """Base of the algorithm classes (construct with a Call, then `run()` -> success): the
    call's fields as attributes, and the list of issued works (buried on failure)."""

    def __init__(self, call: Call) -> None:
        self.comm = call.comm
        self.x = call.x
        self.result = call.result
        self.mean = call.mean
        self.seed = call.seed
        self.stats = call.stats
        self.description = call.description
        self.state = call.state
        self.err = call.err
        self._works: list[Any] = []

    def run(self) -> bool:
        raise NotImplementedError
