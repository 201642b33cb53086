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
"""

from __future__ import annotations

import math

import torch
from torch import nn


def hopfield_energy(xi: torch.Tensor, xi0: torch.Tensor, keys: torch.Tensor, beta: float) -> torch.Tensor:
    """Eq. 2 per query: ``||ξ-ξ₀||² - β·logsumexp(ξKᵀ/√d)``; shapes (..., d), (..., d), (n, d)."""
    d = keys.shape[-1]
    return (xi - xi0).pow(2).sum(-1) - beta * torch.logsumexp(xi @ keys.T / math.sqrt(d), dim=-1)


def hopfield_descent(xi0: torch.Tensor, keys: torch.Tensor, beta: float, eta: float, n_steps: int) -> torch.Tensor:
    """``n_steps`` gradient steps (eq. 3-5) on the energy of eq. 2, starting from ξ₀."""
    d = keys.shape[-1]
    xi = xi0
    for _ in range(n_steps):
        alpha = torch.softmax(xi @ keys.T / math.sqrt(d), dim=-1)
        grad = 2 * (xi - xi0) - (beta / math.sqrt(d)) * (alpha @ keys)
        xi = xi - eta * grad
    return xi


def hopfield_retrieve(xi: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, beta: float) -> torch.Tensor:
    """One-step retrieval ``softmax(β ξ Kᵀ / √d) V`` (Ramsauer et al., eq. 6 readout)."""
    d = keys.shape[-1]
    return torch.softmax(beta * (xi @ keys.T) / math.sqrt(d), dim=-1) @ values


class HopfieldRetrieval(nn.Module):
    """V-/R-Hopfield: learned projections θ over a fixed memory bank (registered, not saved)."""

    def __init__(self, query_dim: int, memory: torch.Tensor, hidden_dim: int, out_dim: int,
                 beta: float = 4.0, steps: int = 1, eta: float = 0.1):
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

    def forward(self, queries: torch.Tensor) -> torch.Tensor:
        """``(B, Q, query_dim)`` -> ``(B, Q, out_dim)``."""
        keys, values = self.k_proj(self.memory), self.v_proj(self.memory)
        xi = hopfield_descent(self.q_proj(queries), keys, self.beta, self.eta, self.steps - 1)
        return hopfield_retrieve(xi, keys, values, self.beta)
