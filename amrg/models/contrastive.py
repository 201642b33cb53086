"""Image-report contrastive learning: seed 002's stage #2 (CXPMRG-Bench eq. 3, ``L_CTL = CLIPLoss(Vim(I), LM(R))``;
issue 17), as the release's ``models/MambaXrayVL_CLIP.py`` computes it.

* image feature: the mean over a view's tokens, then the mean over the study's views (:func:`pool_image`),
  projected (``Linear(C -> proj_dim)``);
* report feature: the text encoder's last hidden state at the last non-pad token (``last``, the release's
  [SEP]), the first token (``cls``) or the masked mean (``mean``) (:func:`pool_text`), projected;
* :func:`clip_loss`: both L2-normalised, logits ``s · img @ txt^T`` with ``s = exp(log_scale)``, a learnable
  :class:`LogitScale` initialised to ``1 / 0.07`` (CLIP's, clamped at 100 as CLIP does), and
  ``(CE(image -> text) + CE(text -> image)) / 2`` over the in-batch diagonal;
* :func:`recall_at_k`: retrieval R@k both ways on a held-out set (the diagonal pairs are the matches).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .text_encoder import POOLINGS, pool_hidden

MAX_LOGIT_SCALE = 100.0  # CLIP (Radford et al. 2021, sec. 2.5): the scale is clipped at 100
RECALL_KS = (1, 5, 10)


def clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE of paired features ``(B, D)``: L2-normalised, logits ``logit_scale · img @ txt^T``
    (``logit_scale`` the multiplier, 1/temperature), the mean of the two cross-entropies to the diagonal."""
    if img.shape != txt.shape or img.ndim != 2:
        raise ValueError(f"clip_loss needs paired (B, D) features; got {tuple(img.shape)} and {tuple(txt.shape)}")
    logits = logit_scale * F.normalize(img.float(), dim=-1) @ F.normalize(txt.float(), dim=-1).t()
    labels = torch.arange(len(img), device=img.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def pool_text(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """``(B, L, D)`` right-padded hidden states -> ``(B, D)``: ``last`` non-pad token, ``cls``, or ``mean``."""
    if pooling not in POOLINGS:
        raise ValueError(f"unknown text pooling {pooling!r}; choose from {list(POOLINGS)}")
    return pool_hidden(hidden, mask, pooling)


def pool_image(tokens: torch.Tensor) -> torch.Tensor:
    """``(B, V, N, C)`` tokens of V views -> ``(B, C)``: the token mean of each view, then the view mean."""
    if tokens.ndim != 4:
        raise ValueError(f"pool_image needs (B, views, tokens, C); got {tuple(tokens.shape)}")
    return tokens.mean(2).mean(1)


class LogitScale(nn.Module):
    """CLIP's learnable temperature: ``log_scale`` initialised to ``log(1 / temperature)``; the multiplier
    ``exp(log_scale)`` clamped at :data:`MAX_LOGIT_SCALE`. ``learn: false`` keeps it fixed."""

    def __init__(self, temperature: float, learn: bool = True):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)), requires_grad=learn)

    def forward(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=MAX_LOGIT_SCALE)


@torch.no_grad()
def recall_at_k(img: torch.Tensor, txt: torch.Tensor, ks: tuple[int, ...] = RECALL_KS) -> dict[str, float]:
    """Retrieval recall of paired ``(N, D)`` features (pair i matches i) by cosine similarity:
    ``i2t_r{k}`` the share of images whose report ranks in the top k, ``t2i_r{k}`` the reverse. A rank is
    the number of candidates scoring strictly higher than the match."""
    sim = F.normalize(img.float(), dim=-1) @ F.normalize(txt.float(), dim=-1).t()
    match = sim.diagonal()
    rank_i2t = (sim > match[:, None]).sum(1)
    rank_t2i = (sim > match[None, :]).sum(0)
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = float((rank_i2t < k).float().mean())
        out[f"t2i_r{k}"] = float((rank_t2i < k).float().mean())
    return out


class ImageReportCLIP(nn.Module):
    """Vision encoder (uint8 ``(B, H, W)`` -> tokens, :class:`amrg.models.vision.VisionEncoder`), text encoder
    (an HF encoder: ``input_ids``/``attention_mask`` -> ``last_hidden_state``), their projections to
    ``proj_dim`` and the logit scale; ``forward`` gives the eq. 3 loss of a batch of studies."""

    def __init__(self, vision: nn.Module, text: nn.Module, text_dim: int, proj_dim: int, text_pool: str,
                 temperature: float, learn_temperature: bool):
        super().__init__()
        self.vision, self.text, self.text_pool = vision, text, text_pool
        self.img_proj = nn.Linear(vision.num_features, proj_dim)
        self.txt_proj = nn.Linear(text_dim, proj_dim)
        self.logit_scale = LogitScale(temperature, learn_temperature)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, V, H, W)`` -> projected ``(B, proj_dim)`` (token mean, view mean, projection)."""
        b, v = pixels.shape[:2]
        tokens = self.vision(pixels.flatten(0, 1))
        return self.img_proj(pool_image(tokens.view(b, v, *tokens.shape[1:])))

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.txt_proj(pool_text(hidden, attention_mask, self.text_pool))

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return clip_loss(self.image_features(pixels), self.text_features(input_ids, attention_mask), self.logit_scale())
