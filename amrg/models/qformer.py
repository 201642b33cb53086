"""Q-Former (BLIP-2 style): learned disease queries read the image tokens.

Each of ``layers`` blocks: self-attention over the queries, cross-attention from the queries to the
image tokens, a feed-forward network; pre-norm residuals. With ``n_queries = 14`` each query is one
CheXpert observation (paper: Q_d in R^{14 x 768}); its output is that disease's feature F_d.
"""

from __future__ import annotations

import torch
from torch import nn


class QFormerBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm_self, self.norm_cross, self.norm_ffn = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, q: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        h = self.norm_self(q)
        q = q + self.self_attn(h, h, h, need_weights=False)[0]
        h = self.norm_cross(q)
        q = q + self.cross_attn(h, tokens, tokens, need_weights=False)[0]
        return q + self.ffn(self.norm_ffn(q))


class QFormer(nn.Module):
    def __init__(self, token_dim: int, dim: int = 768, layers: int = 2, heads: int = 8, n_queries: int = 14):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(n_queries, dim) * 0.02)
        self.token_proj = nn.Sequential(nn.LayerNorm(token_dim), nn.Linear(token_dim, dim))
        self.blocks = nn.ModuleList(QFormerBlock(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Image tokens ``(B, N, C)`` -> disease features ``(B, n_queries, dim)``."""
        kv = self.token_proj(tokens)
        q = self.queries.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        for block in self.blocks:
            q = block(q, kv)
        return self.norm(q)


def orthogonality_loss(queries: torch.Tensor) -> torch.Tensor:
    """Mean squared off-diagonal cosine similarity of the queries.

    With Q̂ the row-normalised queries (n x d): L_orth = ||Q̂ Q̂ᵀ - I||_F² / (n (n - 1)).
    It is 0 iff the queries are mutually orthogonal and 1 when they are all parallel.
    """
    qn = nn.functional.normalize(queries, dim=-1)
    n = qn.shape[0]
    gram = qn @ qn.T
    off = gram - torch.eye(n, device=qn.device, dtype=qn.dtype)
    return off.pow(2).sum() / (n * (n - 1))
