"""Stage-1 disease classifier (paper III-B): vision encoder -> Q-Former -> one logit per disease query.

Loss (eq. 11, :func:`classifier_loss`): BCE over the 14 observations (``pos_weight`` from
:func:`positive_weights`) + ``ortho_weight`` x :func:`~amrg.models.qformer.orthogonality_loss` of the
disease queries or of each image's disease features (``classifier.ortho_on``). The head scores each
disease from its own query output: ``logit_k = <w_k, F_d[k]> + b_k``. The Q-Former is ``qformer.kind``
(:func:`~amrg.models.qformer.build_qformer`: scratch or BLIP-2's).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from torch import nn

from ..io import autocast, progress
from .qformer import build_qformer, orthogonality_loss
from .vision import VisionEncoder


@dataclass
class ClassifierSpec:
    """Everything needed to rebuild the architecture (written to ``classifier/config.json``).

    ``qformer_config`` is the BLIP-2 Q-Former's ``Blip2QFormerConfig`` as built (filled in by
    :class:`DiseaseClassifier`), so a trained classifier rebuilds without the checkpoint it started from.
    A scratch spec writes only the keys it had before the BLIP-2 option (older configs load as scratch).
    """

    vision_name: str
    vision_kwargs: dict = field(default_factory=dict)
    img_size: int = 224
    qformer_dim: int = 768
    qformer_layers: int = 2
    qformer_heads: int = 8
    n_queries: int = 14
    qformer_kind: str = "scratch"
    qformer_cross_attention_frequency: int = 2
    qformer_config: dict | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.qformer_kind == "scratch":
            for k in BLIP2_KEYS:
                d.pop(k)
        return d


BLIP2_KEYS = ("qformer_kind", "qformer_cross_attention_frequency", "qformer_config")


class DiseaseClassifier(nn.Module):
    def __init__(self, spec: ClassifierSpec, pretrained: bool = False, checkpoint: str | None = None,
                 qformer_pretrained: str | None = None):
        """``pretrained``/``checkpoint``: the vision encoder's initial weights; ``qformer_pretrained``: the
        BLIP-2 Q-Former's (``qformer.pretrained``; ignored when the spec already holds its config)."""
        super().__init__()
        self.encoder = VisionEncoder(spec.vision_name, pretrained, checkpoint, spec.img_size, **spec.vision_kwargs)
        self.qformer = build_qformer(self.encoder.num_features, spec.qformer_kind, spec.qformer_dim,
                                     spec.qformer_layers, spec.qformer_heads, spec.n_queries,
                                     spec.qformer_cross_attention_frequency, spec.qformer_config,
                                     None if spec.qformer_config is not None else qformer_pretrained)
        if spec.qformer_kind == "blip2" and spec.qformer_config is None:
            spec = replace(spec, qformer_config=self.qformer.config_dict)
        self.spec = spec
        self.head_weight = nn.Parameter(torch.randn(spec.n_queries, spec.qformer_dim) * 0.02)
        self.head_bias = nn.Parameter(torch.zeros(spec.n_queries))

    def features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 ``(B, H, W)`` -> (image tokens F ``(B, N, C)``, disease features F_d ``(B, 14, D)``)."""
        tokens = self.encoder(pixels)
        return tokens, self.qformer(tokens)

    def head(self, disease_features: torch.Tensor) -> torch.Tensor:
        return (disease_features * self.head_weight).sum(-1) + self.head_bias

    def forward(self, pixels: torch.Tensor, with_features: bool = False):
        """Logits ``(B, 14)``; with ``with_features``, ``(logits, F_d)`` (one call, so DDP sees it)."""
        fd = self.features(pixels)[1]
        return (self.head(fd), fd) if with_features else self.head(fd)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, ortho_weight: float,
             pos_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """eq. 11 on this model's disease queries: see :func:`classifier_loss`."""
        return classifier_loss(logits, targets, self.qformer.queries, ortho_weight, pos_weight)


def classifier_loss(logits: torch.Tensor, targets: torch.Tensor, ortho_rows: torch.Tensor, ortho_weight: float,
                    pos_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """eq. 11: ``L = BCE(logits, targets; pos_weight) + ortho_weight * L_orth(ortho_rows)``.

    The BCE with logits is the mean over every (image, disease) entry of
    ``-(p_k y log σ(x) + (1 - y) log(1 - σ(x)))`` with ``p_k = pos_weight[k]`` (1 when ``None``);
    ``L_orth`` is :func:`~amrg.models.qformer.orthogonality_loss` of the disease queries ``(14, D)``
    (``classifier.ortho_on: queries``) or of each image's disease features F_d ``(B, 14, D)``, averaged
    over the batch (``features``). Returns the loss and its two terms as floats (``{"bce": ..., "ortho": ...}``).
    """
    bce = nn.functional.binary_cross_entropy_with_logits(logits, targets, pos_weight=pos_weight)
    orth = orthogonality_loss(ortho_rows)
    return bce + ortho_weight * orth, {"bce": bce.item(), "ortho": orth.item()}


def positive_weights(targets: torch.Tensor, cap: float) -> torch.Tensor:
    """eq. 11's BCE ``pos_weight`` per disease: ``(n - pos_k) / max(pos_k, 1)``, clamped at ``cap``.

    ``targets`` are binarised ``(n, 14)``; a disease with no positive gets ``min(n, cap)``.
    """
    pos = targets.sum(0)
    return ((targets.shape[0] - pos) / pos.clamp(min=1)).clamp(max=cap)


@torch.no_grad()
def predict_proba(model: DiseaseClassifier, pixels: torch.Tensor, rows, device: torch.device,
                  precision: str, batch: int) -> np.ndarray:
    """Sigmoid probabilities ``(len(rows), 14)`` for the images ``pixels[rows]``, in batches."""
    model.eval()
    out = [torch.zeros(0, model.spec.n_queries)]
    for s in progress(range(0, len(rows), batch), "classifier probabilities", unit="batch"):
        with autocast(device, precision):
            out.append(torch.sigmoid(model(pixels[rows[s:s + batch]].to(device)).float()).cpu())
    return np.asarray(torch.cat(out).numpy())
