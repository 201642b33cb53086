"""Modern Hopfield retrieval (paper III-C, eq. 2-7; Ramsauer et al. 2021).

A query f (here a disease feature F_d[k]) and a frozen memory bank M (n x d_m) are projected by learned
maps θ = (W_q, W_k, W_v): ξ₀ = W_q f, K = W_k M, V = W_v M (d = key width). The state ξ descends the
energy of eq. 2,

    E(ξ) = ||ξ - ξ₀||² - β · logsumexp(ξ Kᵀ / √d),

by ``steps - 1`` gradient steps of eq. 3-5 with step size η:
    ξ ← ξ - η (2 (ξ - ξ₀) - (β/√d) Σ_j α_j k_j),   α = softmax(ξ Kᵀ / √d)
and is then read out as ``softmax(β ξ Kᵀ / √d) V``. With ``steps = 1`` this is exactly the one-step
retrieval ``softmax(β q Kᵀ / √d) V`` of Ramsauer et al.; large β retrieves the value of the nearest
stored pattern. The output width is the LLM's hidden size (paper 4,096).

``top_k > 0`` restricts every query to the k bank rows with the largest initial scores ξ₀·k_j, found by
a faiss inner-product search over the frozen bank (:mod:`amrg.models.memory_index`); the descent and
the readout are then exact over those k rows. Equal to the dense path when k >= n.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .memory_index import MemoryIndex


def _scores(xi: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``ξKᵀ/√d``, ``(..., n)``; where ``mask (..., n)`` is False the score is -inf (not a candidate)."""
    s = xi @ keys.T / math.sqrt(keys.shape[-1])
    return s if mask is None else s.masked_fill(~mask, float("-inf"))


def hopfield_energy(xi: torch.Tensor, xi0: torch.Tensor, keys: torch.Tensor, beta: float) -> torch.Tensor:
    """Eq. 2 per query: ``||ξ-ξ₀||² - β·logsumexp(ξKᵀ/√d)``; shapes (..., d), (..., d), (n, d)."""
    return (xi - xi0).pow(2).sum(-1) - beta * torch.logsumexp(_scores(xi, keys), dim=-1)


def hopfield_descent(xi0: torch.Tensor, keys: torch.Tensor, beta: float, eta: float, n_steps: int,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """``n_steps`` gradient steps (eq. 3-5) on the energy of eq. 2, starting from ξ₀."""
    xi = xi0
    for _ in range(n_steps):
        alpha = torch.softmax(_scores(xi, keys, mask), dim=-1)
        grad = 2 * (xi - xi0) - (beta / math.sqrt(keys.shape[-1])) * (alpha @ keys)
        xi = xi - eta * grad
    return xi


def hopfield_retrieve(xi: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, beta: float,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """One-step retrieval ``softmax(β ξ Kᵀ / √d) V`` (Ramsauer et al., eq. 6 readout)."""
    return torch.softmax(beta * _scores(xi, keys, mask), dim=-1) @ values


class HopfieldRetrieval(nn.Module):
    """V-/R-Hopfield: learned projections θ over a fixed memory bank (registered, not saved).

    ``index`` (a dict of :class:`~amrg.models.memory_index.MemoryIndex` options) is used when
    ``0 < top_k < n``; the index is built lazily on the bank's device at the first forward.
    """

    def __init__(self, query_dim: int, memory: torch.Tensor, hidden_dim: int, out_dim: int,
                 beta: float = 4.0, steps: int = 1, eta: float = 0.1, top_k: int = 0, index: dict | None = None):
        super().__init__()
        if memory.ndim != 2 or memory.shape[0] == 0:
            raise ValueError(f"memory bank must be a non-empty (n, d) matrix, got {tuple(memory.shape)}")
        if not torch.isfinite(memory).all():
            raise ValueError("memory bank contains NaN or inf")
        self.register_buffer("memory", memory.float(), persistent=False)
        self.q_proj = nn.Linear(query_dim, hidden_dim)
        self.k_proj = nn.Linear(memory.shape[1], hidden_dim)
        self.v_proj = nn.Linear(memory.shape[1], out_dim)
        self.beta, self.steps, self.eta = beta, steps, eta
        self.top_k, self.index_options = (top_k if 0 < top_k < memory.shape[0] else 0), dict(index or {})
        self._index: MemoryIndex | None = None

    def forward(self, queries: torch.Tensor) -> torch.Tensor:
        """``(B, Q, query_dim)`` -> ``(B, Q, out_dim)``."""
        xi0 = self.q_proj(queries)
        if not self.top_k:
            keys, values = self.k_proj(self.memory), self.v_proj(self.memory)
            xi = hopfield_descent(xi0, keys, self.beta, self.eta, self.steps - 1)
            return hopfield_retrieve(xi, keys, values, self.beta)
        # the union U of every query's candidates is projected once; each query's softmax runs over
        # its own k rows of U (the others are masked), so the cost scales with |U| <= B·Q·k, not n
        ids = self.candidates(xi0)  # (B, Q, k), -1 where an approximate index found fewer
        found = ids >= 0
        union, where = ids[found].unique(return_inverse=True)
        mask = torch.zeros(*ids.shape[:-1], len(union), dtype=torch.bool, device=ids.device)
        query_of = torch.arange(found.shape[:-1].numel(), device=ids.device).view(*ids.shape[:-1], 1).expand_as(ids)
        mask.view(-1, len(union))[query_of[found], where] = True
        rows = self.memory[union]
        keys, values = self.k_proj(rows), self.v_proj(rows)
        xi = hopfield_descent(xi0, keys, self.beta, self.eta, self.steps - 1, mask)
        return hopfield_retrieve(xi, keys, values, self.beta, mask)

    @torch.no_grad()
    def candidates(self, xi0: torch.Tensor) -> torch.Tensor:
        """Bank rows with the top-k scores ξ₀·k_j: an inner-product search of ``W_kᵀ ξ₀`` over the raw bank."""
        if self._index is None:
            self._index = MemoryIndex(self.memory, **self.index_options)
        query = xi0.reshape(-1, xi0.shape[-1]).float() @ self.k_proj.weight.float()
        return self._index.search(query, self.top_k).reshape(*xi0.shape[:-1], -1)
