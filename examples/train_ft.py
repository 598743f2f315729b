"""Fault-tolerant data-parallel training of a small character-level language model.

The data is CPython's own standard library source (ships with every Python). Each worker
computes gradients on its own batches; gradients are all-reduced exactly through the manager
every step and applied only when the step commits. Workers may die, hang, join or leave at
any time (try `lococomm run --workers 4 --chaos default examples/train_ft.py`): joiners and
restarted workers are healed with the model, the optimizer state and the data position.

    lococomm run --workers 4 --chaos default examples/train_ft.py --steps 300
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sysconfig
import time
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F

import lococomm as lc

log = logging.getLogger("train_ft")


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


class CharModel(torch.nn.Module):
    """A small causal transformer over bytes."""

    def __init__(self, context: int = 64, width: int = 96, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(256, width)
        self.position = torch.nn.Parameter(torch.randn(context, width) * 0.02)
        layer = torch.nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=4 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, 256)
        self.register_buffer("mask", torch.nn.Transformer.generate_square_subsequent_mask(context))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[1]
        h = self.embed(tokens) + self.position[:n]
        h = self.blocks(h, mask=self.mask[:n, :n], is_causal=True)
        return self.head(self.norm(h))


def batch(data: torch.Tensor, context: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, data.numel() - context - 1, (size,), generator=g)
    rows = torch.stack([data[s : s + context + 1] for s in starts.tolist()])
    return rows[:, :-1], rows[:, 1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-every", type=int, default=50)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(1)

    corpus = load_corpus()
    split = int(corpus.numel() * 0.95)
    train, held_out = corpus[:split], corpus[split:]
    replica = os.environ.get("LOCOCOMM_REPLICA_ID", "w0")
    # Every worker starts from its own random init: the first step makes them identical.
    torch.manual_seed(sum(map(ord, replica)))
    model = CharModel(context=args.context)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
    )
    params = [p for p in model.parameters() if p.requires_grad]
    flat = torch.zeros(sum(p.numel() for p in params))

    with lc.Manager.from_env(
        state={"model": model, "optimizer": optimizer, "schedule": schedule}, timeout=30
    ) as manager:
        started = time.monotonic()
        retries = 0
        while manager.step < args.steps:
            manager.start_step()
            step = manager.step
            x, y = batch(train, args.context, args.batch, seed=zlib.crc32(f"{replica}/{step}/{retries}".encode()))
            loss = F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))
            optimizer.zero_grad(set_to_none=False)
            loss.backward()
            offset = 0
            for p in params:
                flat[offset : offset + p.numel()].copy_(p.grad.reshape(-1))
                offset += p.numel()
            manager.allreduce(flat, op="mean", name="grads")
            manager.report(loss=round(loss.item(), 4))
            if not manager.commit():
                retries += 1
                continue  # nothing applied; the next start_step re-forms the group
            offset = 0
            for p in params:
                p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
            optimizer.step()
            schedule.step()
            if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
                with torch.no_grad():
                    xe, ye = batch(held_out, args.context, 64, seed=1234)
                    eval_loss = F.cross_entropy(model(xe).reshape(-1, 256), ye.reshape(-1)).item()
                log.info(
                    "step %d  train loss %.3f  eval loss %.3f  members %d  %.1f steps/s",
                    step + 1,
                    loss.item(),
                    eval_loss,
                    manager.world_size,
                    (step + 1) / (time.monotonic() - started),
                )


if __name__ == "__main__":
    main()
