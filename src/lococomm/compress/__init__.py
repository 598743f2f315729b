"""Compression: codecs (what goes on the wire), error feedback, adaptive per-layer choice, and a
DDP communication hook. See docs/compression.md.

    from lococomm.compress import codecs, ErrorFeedback
    codec = codecs.Int8()                      # block-absmax int8, 8.125 bits/value
    ef = ErrorFeedback(codec)
    payload = ef.compress("layer1.weight", grad, seed)
    ...
"""

from . import codecs
from .adaptive import Adaptive, lgreco_plan
from .base import Codec, derive_seed
from .codecs import (
    BF16,
    FP8E4M3,
    FP8E5M2,
    FP16,
    BlockQuant,
    Identity,
    Int2,
    Int4,
    Int8,
    PowerSGD,
    RandK,
    SignSGD,
    SparseLoCo,
    TopK,
    from_spec,
)
from .ddp import DDPCompressionHook, ddp_hook
from .error_feedback import EF21, EControl, ErrorFeedback
from .payload import Payload

__all__ = [
    "BF16",
    "EF21",
    "FP8E4M3",
    "FP8E5M2",
    "FP16",
    "Adaptive",
    "BlockQuant",
    "Codec",
    "DDPCompressionHook",
    "EControl",
    "ErrorFeedback",
    "Identity",
    "Int2",
    "Int4",
    "Int8",
    "Payload",
    "PowerSGD",
    "RandK",
    "SignSGD",
    "SparseLoCo",
    "TopK",
    "codecs",
    "ddp_hook",
    "derive_seed",
    "from_spec",
    "lgreco_plan",
]
