"""One resumable training loop for both training stages (classifier and generator).

AdamW + linear warmup then cosine decay, gradient accumulation, best-on-validation selection, and a
checkpoint (model, optimizer, scheduler, position in the epoch, RNG state, best weights, history)
written atomically every ``checkpoint_every`` optimizer steps. Batch order is a seeded permutation per
epoch, so a run killed mid-epoch and started again skips the batches already done and ends with the
same weights as an uninterrupted run (on CPU). The checkpoint carries a fingerprint of the stage's
params and inputs: a changed configuration never resumes from a stale state.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from .io import load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)


@dataclass
class LoopConfig:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_accum: int = 1
    checkpoint_every: int = 50
    seed: int = 0
    max_grad_norm: float = 1.0


class StopAfter(Exception):
    """Raised by tests (via ``stop_after_steps``) to simulate a kill mid-epoch."""


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    return list(torch.randperm(n, generator=g).split(batch_size))


def fit(model: torch.nn.Module, n_train: int, batch_loss: Callable[[torch.Tensor], torch.Tensor],
        validate: Callable[[], dict[str, float]], cfg: LoopConfig, checkpoint: Path, fingerprint: str,
        select: str = "val_loss", mode: str = "min", stop_after_steps: int | None = None,
        ) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Train ``model``'s trainable parameters; return (best trainable state, per-epoch history)."""
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_epoch = math.ceil(math.ceil(n_train / cfg.batch_size) / cfg.grad_accum)
    sched = get_cosine_schedule_with_warmup(opt, cfg.warmup_steps, per_epoch * cfg.epochs)
    state = {"epoch": 0, "batch": 0, "step": 0, "best": None, "best_score": None, "history": []}

    def snapshot() -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in zip(names, params)}

    ckpt = load_checkpoint(checkpoint)
    if ckpt is not None and ckpt.get("fingerprint") == fingerprint:
        model.load_state_dict(ckpt["model"], strict=False)
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng"])
        state = ckpt["loop"]
        log.info("resuming from %s at epoch %d batch %d", checkpoint, state["epoch"], state["batch"])
    elif ckpt is not None:
        log.warning("ignoring checkpoint %s: it was made with other params or inputs", checkpoint)

    def save() -> None:
        trainable = {n: p.detach() for n, p in zip(names, params)}
        save_checkpoint(checkpoint, {"fingerprint": fingerprint, "model": trainable, "optimizer": opt.state_dict(),
                                     "scheduler": sched.state_dict(), "rng": torch.get_rng_state(), "loop": state})

    steps_this_run = 0
    while state["epoch"] < cfg.epochs:
        batches = epoch_batches(n_train, cfg.batch_size, cfg.seed, state["epoch"])
        model.train()
        running, seen = 0.0, 0
        bar = tqdm(range(state["batch"], len(batches)), desc=f"epoch {state['epoch'] + 1}/{cfg.epochs}",
                   leave=False, mininterval=5)
        for b in bar:
            loss = batch_loss(batches[b])
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss.item()} at epoch {state['epoch']} batch {b}")
            (loss / cfg.grad_accum).backward()
            running, seen = running + loss.item(), seen + 1
            state["batch"] = b + 1
            if (b + 1) % cfg.grad_accum == 0 or b + 1 == len(batches):
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                state["step"] += 1
                steps_this_run += 1
                if state["step"] % cfg.checkpoint_every == 0 and b + 1 < len(batches):
                    save()
                if stop_after_steps is not None and steps_this_run >= stop_after_steps:
                    save()
                    raise StopAfter(f"stopped after {steps_this_run} steps")
        metrics = {"epoch": state["epoch"] + 1, "train_loss": running / max(seen, 1), **validate()}
        log.info("epoch %d: %s", state["epoch"] + 1, {k: round(v, 4) for k, v in metrics.items() if "/" not in k})
        state["history"].append(metrics)
        score = metrics[select]
        better = state["best_score"] is None or (score < state["best_score"] if mode == "min" else score > state["best_score"])
        if better:
            state["best"], state["best_score"] = snapshot(), score
        state["epoch"], state["batch"] = state["epoch"] + 1, 0
        save()
    best = copy.deepcopy(state["best"])
    checkpoint.unlink(missing_ok=True)
    return best, state["history"]
