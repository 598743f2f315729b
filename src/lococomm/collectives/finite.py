"""Cheap finiteness check for codecs built with nonfinite="raise".

`isfinite(x).all()` on 16M fp32 values takes ~0.1 s on one thread here (a bool tensor and a
reduction); a sum takes ~8 ms. Any inf/nan makes the sum non-finite, so a finite sum proves the
input finite; a non-finite sum (inf/nan, or a sum that overflowed) falls back to the codec's
exact check, which raises with the count of bad values (or passes if the sum merely overflowed).
"""

from __future__ import annotations

import math

import torch

from lococomm.compress.base import Codec


def check_finite(codec: Codec, x: torch.Tensor) -> None:
    """Raise like codec.encode would if `x` holds inf/nan and the codec's mode is "raise"."""
    if codec.nonfinite != "raise" or x.numel() == 0:
        return
    if not math.isfinite(float(x.sum(dtype=torch.float32))):
        codec._check_finite(x)
