"""What :func:`amrg.train.fit` trains: the loss of a batch and the validation metrics, per model.

- :class:`ClassifierTask`: stage 1 (paper III-B), eq. 11 on every image of the training studies,
  validated by BCE and mean AUROC on the validation images.
- :class:`GeneratorTask`: stage 2 (paper III-C/D), eq. 12 on precomputed stage-1 features, validated
  by the token-mean loss and by BLEU-4 of greedy validation reports.
"""

from __future__ import annotations

import numpy as np
import torch

from .config import Decode
from .io import autocast, progress
from .metrics import nlg_scores
from .metrics.classification import multilabel_metrics
from .models.classifier import classifier_loss, predict_proba


class ClassifierTask:
    """uint8 ``pixels (N, S, S)``, binary ``targets (N, 14)``; ``train``/``val`` are image rows."""

    def __init__(self, model, pixels: torch.Tensor, targets: torch.Tensor, train: np.ndarray, val: np.ndarray,
                 ortho_weight: float, pos_weight: torch.Tensor | None, batch_size: int, device: torch.device,
                 precision: str):
        self.model, self.pixels, self.targets, self.train, self.val = model, pixels, targets, train, val
        self.ortho_weight, self.pos_weight, self.batch_size = ortho_weight, pos_weight, batch_size
        self.device, self.precision = device, precision

    def batch_loss(self, net: torch.nn.Module, b: torch.Tensor) -> torch.Tensor:
        rows = self.train[b.numpy()]
        with autocast(self.device, self.precision):
            logits = net(self.pixels[rows].to(self.device)).float()
        return classifier_loss(logits, self.targets[rows].to(self.device), self.model.qformer.queries,
                               self.ortho_weight, self.pos_weight)[0]

    def probabilities(self, rows: np.ndarray) -> np.ndarray:
        return predict_proba(self.model, self.pixels, rows, self.device, self.precision, self.batch_size)

    def validate(self) -> dict[str, float]:
        probs, t = self.probabilities(self.val), self.targets[self.val]
        bce = torch.nn.functional.binary_cross_entropy(torch.from_numpy(probs).clamp(1e-6, 1 - 1e-6), t)
        m = multilabel_metrics(t.numpy(), probs)
        per_label = {f"val_auroc_label/{k}": v["auroc"] for k, v in m["per_label"].items() if v["auroc"] is not None}
        return {"val_loss": float(bce), "val_auroc": m["mean_auroc"] or 0.0, **per_label}


def tokenize_reports(tokenizer, reports: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Report token ids + EOS, right-padded: ``(N, L)`` ids and attention mask."""
    ids = tokenizer(reports, add_special_tokens=False, truncation=True, max_length=max_tokens - 1)["input_ids"]
    ids = [x + [tokenizer.eos_token_id] for x in ids]
    width = max(len(x) for x in ids)
    out = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        out[i, : len(x)], mask[i, : len(x)] = torch.tensor(x), 1
    return out, mask


class GeneratorTask:
    """``features[split] = (F, F_d)`` of the split's studies, ``reports[split]`` their reference texts."""

    def __init__(self, model, features: dict[str, tuple[torch.Tensor, torch.Tensor]], reports: dict[str, list[str]],
                 max_tokens: int, batch_size: int, device: torch.device, precision: str):
        self.model, self.features, self.reports = model, features, reports
        self.ids = {split: tokenize_reports(model.tokenizer, texts, max_tokens) for split, texts in reports.items()}
        self.greedy = Decode(num_beams=1, max_new_tokens=max_tokens, min_new_tokens=1)
        self.batch_size, self.device, self.precision = batch_size, device, precision

    def loss(self, net: torch.nn.Module, split: str, b: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Mean loss over the report tokens of rows ``b`` of ``split`` and how many tokens that is."""
        (f, fd), (tok, mask) = self.features[split], self.ids[split]
        width = int(mask[b].sum(1).max())
        with autocast(self.device, self.precision):
            loss = net(f[b].to(self.device), fd[b].to(self.device), tok[b, :width].to(self.device),
                       mask[b, :width].to(self.device)).float()
        return loss, int(mask[b].sum())

    def batch_loss(self, net: torch.nn.Module, b: torch.Tensor) -> tuple[torch.Tensor, int]:
        return self.loss(net, "train", b)

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        self.model.eval()
        f, fd = self.features["val"]
        total, n_tokens, hyps = 0.0, 0, []
        for b in progress(torch.arange(len(f)).split(self.batch_size), "validation decoding", unit="batch"):
            loss, n = self.loss(self.model, "val", b)
            total, n_tokens = total + float(loss) * n, n_tokens + n
            with autocast(self.device, self.precision):
                hyps += self.model.generate(f[b].to(self.device), fd[b].to(self.device), self.greedy)
        return {"val_loss": total / max(n_tokens, 1),
                "val_bleu4": nlg_scores(self.reports["val"], hyps, meteor=False)["BLEU_4"]}
