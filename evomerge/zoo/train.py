"""Deterministic CPU training of zoo models: length-bucketed batches, AdamW, warmup + cosine.

All data of a run is generated up front from one seeded ``random.Random`` and batched in a fixed
order, and ``torch.manual_seed`` fixes everything else, so the same spec gives bit-identical
weights on the same machine. Batches are right-padded with no attention mask (causal attention
never looks right, so padding cannot leak into real positions) and the loss covers exactly the
tokens each sequence marks as trained.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from rich.progress import (
    BarColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from transformers import LlamaForCausalLM

from evomerge.zoo.corpus import Sequence
from evomerge.zoo.languages import BOS, EOS, PAD, vocabulary

BUCKET_BATCHES = 32


@dataclass(frozen=True)
class TrainConfig:
    """One training run's optimisation settings."""

    steps: int
    lr: float
    batch_size: int
    warmup: int
    weight_decay: float = 0.01
    seed: int = 0


@dataclass(frozen=True)
class TrainStats:
    """What a run did: final loss (mean of the last 5 % of steps), trained tokens and wall time."""

    final_loss: float
    tokens: int
    seconds: float


def encode(seqs: list[Sequence]) -> list[tuple[list[int], list[bool]]]:
    """Sequences as (ids, trained-mask) with BOS in front (never trained) and EOS at the end (trained)."""
    index = {t: i for i, t in enumerate(vocabulary())}
    bos, eos = index[BOS], index[EOS]
    return [
        ([bos, *(index[t] for t in s.tokens), eos], [False, *s.loss, True]) for s in seqs
    ]


def batches(
    data: list[tuple[list[int], list[bool]]], batch_size: int, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Length-bucketed (ids, labels) batches in a seeded order; labels are -100 where not trained."""
    pad = vocabulary().index(PAD)
    rng = random.Random(seed)
    order = list(range(len(data)))
    rng.shuffle(order)
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    chunk = batch_size * BUCKET_BATCHES
    for start in range(0, len(order) - batch_size + 1, chunk):
        window = sorted(order[start : start + chunk], key=lambda i: len(data[i][0]))
        for b in range(0, len(window) - batch_size + 1, batch_size):
            rows = [data[i] for i in window[b : b + batch_size]]
            width = max(len(ids) for ids, _ in rows)
            ids = torch.full((batch_size, width), pad, dtype=torch.long)
            labels = torch.full((batch_size, width), -100, dtype=torch.long)
            for r, (tok, mask) in enumerate(rows):
                ids[r, : len(tok)] = torch.tensor(tok)
                lab = torch.tensor(tok)
                lab[~torch.tensor(mask)] = -100
                labels[r, : len(tok)] = lab
            out.append((ids, labels))
    rng.shuffle(out)
    return out


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``cfg.lr``, then cosine decay to 10 % of it."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def train(
    model: LlamaForCausalLM,
    sample: Callable[[random.Random], Sequence],
    cfg: TrainConfig,
    *,
    label: str,
    progress: Progress | None = None,
) -> TrainStats:
    """Train ``model`` in place for ``cfg.steps`` steps on sequences drawn by ``sample``."""
    rng = random.Random(f"train:{label}:{cfg.seed}")
    n = cfg.steps * cfg.batch_size
    data = encode([sample(rng) for _ in range(n + cfg.batch_size * BUCKET_BATCHES)])
    plan = batches(data, cfg.batch_size, cfg.seed)[: cfg.steps]
    if len(plan) < cfg.steps:
        raise RuntimeError(f"{label}: built {len(plan)} batches for {cfg.steps} steps")
    torch.manual_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )
    model.train()
    own = progress is None
    prog = progress or Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]:.3f}"), TextColumn("{task.fields[tps]:.0f} tok/s"),
        TimeElapsedColumn(), TimeRemainingColumn(),
    )
    losses: list[float] = []
    tokens = 0
    t0 = time.perf_counter()
    with prog if own else contextlib.nullcontext():
        bar = prog.add_task(label, total=cfg.steps, loss=float("nan"), tps=0.0)
        for step, (ids, labels) in enumerate(plan):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            logits = model(input_ids=ids).logits
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(loss.item())
            tokens += int((ids != vocabulary().index(PAD)).sum())
            prog.update(bar, advance=1, loss=loss.item(), tps=tokens / (time.perf_counter() - t0))
    model.eval()
    tail = losses[-max(1, len(losses) // 20) :]
    return TrainStats(sum(tail) / len(tail), tokens, time.perf_counter() - t0)

