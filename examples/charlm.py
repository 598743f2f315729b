"""A small character-level language model on CPython's standard-library sources.

Shared by the examples, the DiLoCo quality benchmark and the tests: real text that ships
with every Python (no download), a causal transformer over bytes, and batches drawn from a
seed so that every worker's data order is reproducible.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch
import torch.nn.functional as F

VOCAB = 256  # bytes


def load_corpus(max_bytes: int = 2_000_000) -> torch.Tensor:
    """Bytes of the standard library's .py files (sorted, so every worker sees the same text)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if not chunks:
        raise RuntimeError(f"no Python sources found under {root}")
    return torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8).long()


def split(corpus: torch.Tensor, held_out: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) split at a fixed position: the last `held_out` fraction is held out."""
    cut = int(corpus.numel() * (1.0 - held_out))
    return corpus[:cut], corpus[cut:]


class CharModel(torch.nn.Module):
    """A small pre-norm causal transformer over bytes."""

    def __init__(self, context: int = 64, width: int = 96, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, width)
        self.position = torch.nn.Parameter(torch.randn(context, width) * 0.02)
        layer = torch.nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=4 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, VOCAB)
        self.register_buffer("mask", torch.nn.Transformer.generate_square_subsequent_mask(context))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[1]
        h = self.embed(tokens) + self.position[:n]
        h = self.blocks(h, mask=self.mask[:n, :n], is_causal=True)
        return self.head(self.norm(h))


def batch(data: torch.Tensor, context: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`size` random windows of `context` + 1 bytes (inputs, next-byte targets) from a seed."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, data.numel() - context - 1, (size,), generator=g)
    rows = torch.stack([data[s : s + context + 1] for s in starts.tolist()])
    return rows[:, :-1], rows[:, 1:]


def loss_of(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats)."""
    return F.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))


@torch.no_grad()
def evaluate(model: torch.nn.Module, held_out: torch.Tensor, context: int, batches: int = 4,
             size: int = 64, seed: int = 1234) -> float:
    """Mean loss over `batches` fixed held-out batches (the same windows on every call)."""
    total = 0.0
    for i in range(batches):
        x, y = batch(held_out, context, size, seed=seed + i)
        total += loss_of(model, x, y).item()
    return total / batches
