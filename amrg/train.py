"""One resumable training loop for both training stages (classifier and generator).

AdamW + linear warmup then cosine decay, gradient accumulation, best-on-validation selection, and a
checkpoint (model, optimizer, scheduler, position in the epoch, RNG state, best weights, history)
written atomically every ``checkpoint_every`` optimizer steps. Batch order is a seeded permutation per
epoch, so a run killed mid-epoch and started again skips the batches already done and ends with the
same weights as an uninterrupted run (on CPU). The checkpoint carries a fingerprint of the stage's
params and inputs: a changed configuration never resumes from a stale state.

Under a launcher (:mod:`amrg.dist`) the model is wrapped in ``DistributedDataParallel`` and each global
batch is split across the ranks. ``batch_loss`` returns the mean loss of its shard and, optionally, the
number of items it averaged over (tokens for a language model; samples by default); each rank's loss
is weighted by its share of the global count, so the averaged gradient is exactly that of the global
batch's mean loss. Rank 0 writes the checkpoints.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from . import dist
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
    betas: tuple = (0.9, 0.999)  # AdamW's (MambaXray-VL's pre-training: (0.9, 0.95))
    # learning rate of the parameters whose name starts with a prefix (e.g. a trainable encoder's own lr);
    # every other trainable parameter gets ``lr``. One AdamW param group each, sharing the schedule.
    lr_by_prefix: dict = field(default_factory=dict)
    no_decay_1d: bool = False  # no weight decay on 1-D parameters (norms, biases, scales), as MAE / ARM train


@dataclass(frozen=True)
class Selection:
    """Which epoch is kept: the one with the best ``metric`` of the validation history, ``mode``
    ``min`` (a loss) or ``max`` (a score); ties keep the earlier epoch."""

    metric: str
    mode: str  # "min" | "max"

    def __post_init__(self):
        if self.mode not in ("min", "max"):
            raise ValueError(f"Selection.mode must be 'min' or 'max', got {self.mode!r}")

    @classmethod
    def of(cls, metric: str) -> "Selection":
        """The rule for a named metric: losses are minimised, everything else maximised."""
        return cls(metric, "min" if metric.endswith("loss") else "max")

    def better(self, score: float, best: float | None) -> bool:
        return best is None or (score < best if self.mode == "min" else score > best)


@dataclass
class FitResult:
    best_state: dict[str, torch.Tensor]  # trainable weights of the kept epoch
    history: list[dict]  # one row per epoch: epoch, train_loss, validation metrics
    best: dict  # the history row of the kept epoch


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int,
                  weights: torch.Tensor | None = None) -> list[torch.Tensor]:
    """An epoch's batches of training rows: a seeded permutation of the ``n`` rows, or with ``weights``
    ``n`` rows drawn with replacement in proportion to them (:func:`balanced_weights`)."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    if weights is None:
        return list(torch.randperm(n, generator=g).split(batch_size))
    return list(torch.multinomial(weights.double(), n, replacement=True, generator=g).split(batch_size))


def balanced_weights(labels, exponent: float) -> torch.Tensor | None:
    """Class-balanced sampling weights of training studies (repeat-factor sampling, Gupta et al. 2019,
    LVIS sec. 4): ``labels (N, K)`` binary; a study's weight is the largest ``(N / n_k) ** exponent`` over its
    positive labels k (a study without any gets weight 1; ``n_k`` positives of label k). Exponent 0 (or no
    positive anywhere): None, uniform epochs. Rare findings are then seen more often than the most frequent
    report, so greedy decoding is not pulled to it by the training prior alone."""
    if exponent <= 0:
        return None
    labels = torch.as_tensor(labels, dtype=torch.float64) > 0
    counts = labels.sum(0).double()
    if not counts.any():
        return None
    factor = torch.where(counts > 0, len(labels) / counts.clamp(min=1), torch.zeros_like(counts)) ** exponent
    w = (labels * factor).amax(1)
    return torch.where(w > 0, w, torch.ones_like(w))


def param_groups(names: list[str], params: list[torch.nn.Parameter], cfg: LoopConfig) -> list[dict]:
    """AdamW param groups: one per ``cfg.lr_by_prefix`` entry (its lr), then the rest at ``cfg.lr``; a prefix
    that matches no trainable parameter is an error (a misspelt module name would silently train at ``lr``).
    ``cfg.no_decay_1d`` splits every group into its matrices and its 1-D parameters, the latter without decay."""
    groups, taken = [], set()
    for prefix, lr in cfg.lr_by_prefix.items():
        members = [i for i, n in enumerate(names) if n.startswith(prefix) and i not in taken]
        if not members:
            raise ValueError(f"lr_by_prefix: no trainable parameter name starts with {prefix!r}")
        taken.update(members)
        groups.append({"params": [params[i] for i in members], "lr": lr})
    rest = [p for i, p in enumerate(params) if i not in taken]
    groups = ([{"params": rest}] if rest else []) + groups
    if not cfg.no_decay_1d:
        return groups
    split = []
    for g in groups:
        for decayed in (True, False):
            members = [p for p in g["params"] if (p.ndim > 1) == decayed]
            if members:
                split.append({**g, "params": members, **({} if decayed else {"weight_decay": 0.0})})
    return split


def shard(batch: torch.Tensor, ctx: dist.Context) -> tuple[torch.Tensor, bool]:
    """This rank's contiguous slice of a global batch; an empty slice borrows one item, flagged, so
    every rank still runs the forward/backward that DDP's all-reduce waits for."""
    local = batch.tensor_split(ctx.world)[ctx.rank]
    return (local, True) if len(local) else (batch[:1], False)


def fit(model: torch.nn.Module, n_train: int,
        batch_loss: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor | tuple[torch.Tensor, int]],
        validate: Callable[[], dict[str, float]], cfg: LoopConfig, checkpoint: Path, fingerprint: str,
        selection: Selection = Selection("val_loss", "min"),
        loader: Callable[[list[torch.Tensor]], Iterable] | None = None,
        sample_weights: torch.Tensor | None = None) -> FitResult:
    """Train ``model``'s trainable parameters; return the kept epoch's weights, the per-epoch history
    and the kept epoch's history row (``selection``).

    ``batch_loss(module, indices)`` computes the loss through ``module`` (the DDP wrapper when
    launched, else ``model``) for the training rows ``indices``. With ``loader``, ``loader(shards)`` is
    handed this rank's index shards of the rest of the epoch and yields one batch of data per shard, in
    order (a ``torch.utils.data.DataLoader`` reading and pinning ahead of the step), and ``batch_loss``
    gets that batch instead of the indices.
    """
    ctx = dist.context()
    net = model
    if ctx.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.local_rank] if next(model.parameters()).is_cuda else None,
            broadcast_buffers=False)  # the fixed memory banks are identical on every rank
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(param_groups(names, params, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            betas=tuple(cfg.betas))
    per_epoch = math.ceil(math.ceil(n_train / cfg.batch_size) / cfg.grad_accum)
    sched = get_cosine_schedule_with_warmup(opt, cfg.warmup_steps, per_epoch * cfg.epochs)
    state = {"epoch": 0, "batch": 0, "step": 0, "best": None, "best_score": None, "best_epoch": None, "history": []}

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
        if not ctx.is_main:
            return
        trainable = {n: p.detach() for n, p in zip(names, params)}
        save_checkpoint(checkpoint, {"fingerprint": fingerprint, "model": trainable, "optimizer": opt.state_dict(),
                                     "scheduler": sched.state_dict(), "rng": torch.get_rng_state(), "loop": state})

    while state["epoch"] < cfg.epochs:
        batches = epoch_batches(n_train, cfg.batch_size, cfg.seed, state["epoch"], sample_weights)
        model.train()
        running = torch.zeros(2, dtype=torch.float64)  # Σ loss·items, Σ items (this rank)
        todo = range(state["batch"], len(batches))
        shards = [shard(batches[b], ctx) for b in todo]
        stream = iter(loader([s for s, _ in shards])) if loader is not None else None
        bar = tqdm(todo, desc=f"epoch {state['epoch'] + 1}/{cfg.epochs}", leave=False, mininterval=5,
                   disable=not ctx.is_main)
        for b, (local, real) in zip(bar, shards):
            boundary = (b + 1) % cfg.grad_accum == 0 or b + 1 == len(batches)
            sync = contextlib.nullcontext() if boundary or ctx.world == 1 else net.no_sync()
            with sync:
                out = batch_loss(net, local if stream is None else next(stream))
                loss, count = out if isinstance(out, tuple) else (out, len(local))
                count = float(count) if real else 0.0
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss {loss.item()} at epoch {state['epoch']} batch {b}")
                total = float(dist.all_reduce_sum(torch.tensor([count], dtype=torch.float64))[0])
                (loss * (count * ctx.world / total) / cfg.grad_accum).backward()
            running += torch.tensor([loss.item() * count, count], dtype=torch.float64)
            state["batch"] = b + 1
            if boundary:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                state["step"] += 1
                if state["step"] % cfg.checkpoint_every == 0 and b + 1 < len(batches):
                    save()
        running = dist.all_reduce_sum(running)
        metrics = {"epoch": state["epoch"] + 1, "train_loss": float(running[0] / max(running[1], 1)), **validate()}
        log.info("epoch %d: %s", state["epoch"] + 1, {k: round(v, 4) for k, v in metrics.items() if "/" not in k})
        state["history"].append(metrics)
        if selection.better(metrics[selection.metric], state["best_score"]):
            state["best"], state["best_score"], state["best_epoch"] = snapshot(), metrics[selection.metric], metrics["epoch"]
        state["epoch"], state["batch"] = state["epoch"] + 1, 0
        save()
    best = copy.deepcopy(state["best"])
    dist.barrier()
    if ctx.is_main:
        checkpoint.unlink(missing_ok=True)
    kept = next(h for h in state["history"] if h["epoch"] == state["best_epoch"])
    return FitResult(best, state["history"], kept)
