"""Ready-made configurations of the DiLoCo family (defaults from the papers).

    diloco = lc.presets.sparseloco(model, inner_opt, manager, sync_every=50)

Each returns a `lococomm.algorithms.diloco.DiLoCo`; extra keyword arguments go to it.

==============  ============================================================================
preset          configuration
==============  ============================================================================
diloco          fp32 pseudo-gradients every H steps, outer SGD lr 0.7, momentum 0.9, Nesterov
                (Douillard et al. 2023)
streaming       P = 4 fragments (layers striped), staggered (one every ~H/P steps), tau = 2
                overlapped steps, merge mix 0.5 (alpha = 0.5), Int4 pseudo-gradients with error
                feedback
                (Douillard et al. 2025 use FP4 E3M0: pass codec=lc.codecs.FP4E3M0())
delayed         one-step-delayed outer update: each exchange overlaps the next H inner steps
                (PCCL async DiLoCo / CO2), local progress kept on top of the new global model
sparseloco      chunked top-k (64 of 4096) with 2-bit values, error feedback decayed by 0.95,
                outer SGD lr 1.0 without momentum (the decayed EF plays the momentum's role;
                Sarfi et al. 2025)
==============  ============================================================================
"""

from __future__ import annotations

from typing import Any

import torch

from lococomm.algorithms.diloco import DiLoCo
from lococomm.algorithms.outer import OuterSGD
from lococomm.compress import codecs


def diloco(model: torch.nn.Module, inner_optimizer: torch.optim.Optimizer, manager: Any,
           sync_every: int = 50, **kwargs: Any) -> DiLoCo:
    """Plain DiLoCo (exact fp32 pseudo-gradients, Nesterov outer SGD)."""
    return DiLoCo(model, inner_optimizer, manager, sync_every, **kwargs)


def streaming(model: torch.nn.Module, inner_optimizer: torch.optim.Optimizer, manager: Any,
              sync_every: int = 50, fragments: int = 4, overlap_steps: int = 2, mix: float = 0.5,
              codec: Any = None, **kwargs: Any) -> DiLoCo:
    """Streaming DiLoCo: fragments, overlapped exchanges, 4-bit pseudo-gradients with EF."""
    codec = codecs.Int4() if codec is None else codec
    kwargs.setdefault("error_feedback", True)
    return DiLoCo(model, inner_optimizer, manager, sync_every, fragments=fragments,
                  overlap_steps=overlap_steps, mix=mix, codec=codec, **kwargs)


def delayed(model: torch.nn.Module, inner_optimizer: torch.optim.Optimizer, manager: Any,
            sync_every: int = 50, **kwargs: Any) -> DiLoCo:
    """One-step-delayed DiLoCo (add staleness_penalty / OuterSGD(clip=...) for CO2's options)."""
    return DiLoCo(model, inner_optimizer, manager, sync_every, delayed=True, **kwargs)


def sparseloco(model: torch.nn.Module, inner_optimizer: torch.optim.Optimizer, manager: Any,
               sync_every: int = 50, ratio: float = 64 / 4096, chunk: int = 4096,
               decay: float = 0.95, lr: float = 1.0, rounding: str = "nearest",
               momentum: float = 0.0, nesterov: bool = False, scale_dtype: str = "float32",
               **kwargs: Any) -> DiLoCo:
    """SparseLoCo: top-k per chunk + 2-bit values + decayed error feedback, outer lr 1.0.

    The paper's outer step is plain SGD (the decayed error feedback plays momentum's part);
    `momentum` / `nesterov` add outer momentum on top (it diverged in docs/diloco.md's
    tuning). The tuned setting there (+2.4 % vs DDP, 1067x fewer bytes): ratio=1/16,
    chunk=256 (8-bit offsets), scale_dtype="bfloat16", lr=2.0.
    """
    codec = codecs.SparseLoCo(ratio=ratio, chunk=chunk, rounding=rounding, scale_dtype=scale_dtype)
    outer = OuterSGD(lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)
    return DiLoCo(model, inner_optimizer, manager, sync_every, codec=codec, error_feedback=True,
                  feedback_decay=decay, outer_optimizer=outer, **kwargs)
