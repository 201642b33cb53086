"""Modern Hopfield retrieval (paper III-C, eq. 2-7; Ramsauer et al. 2021; hflayers' ``HopfieldLayer``).

A query f (here a disease feature F_d[k]) and a frozen memory bank M (n x d_m) are projected by learned
maps θ = (W_q, W_k, W_v): ξ₀ = W_q f, K = W_k M, V = W_v M (d = key width per head). One score function
s(ξ) (:func:`hopfield_scores`) and one inverse temperature β serve the whole module: the association
α(ξ) = softmax(β·s(ξ)) (:func:`hopfield_association`) is both the α of the descent and the read-out's
weights. ``hopfield.scaling`` says what β multiplies:

* ``beta_over_sqrt_d`` (default): s(ξ) = ξKᵀ/√d, logits β·ξKᵀ/√d (β = 4 at d = 768 is an effective
  inverse temperature 4/√768 ≈ 0.14, near a global average);
* ``beta``: s(ξ) = ξKᵀ, logits β·ξKᵀ. This is hflayers' meaning, where a given ``scaling`` *replaces*
  1/√head_dim; the released AM-MRG code runs ``scaling=4`` (nearest-pattern regime).

Let β' = β/√d (``beta_over_sqrt_d``) or β (``beta``) be the effective inverse temperature of the raw
inner products, β'·ξKᵀ = β·s(ξ). The state ξ descends the energy of eq. 2 written at that one
temperature (Ramsauer's lse(β', x) = β'⁻¹ log Σ_j exp(β' x_j)),

    E(ξ) = ||ξ - ξ₀||² - β'⁻¹ · logsumexp(β · s(ξ)),

by ``steps - 1`` gradient steps of eq. 3-5 with step size η:

    ξ ← ξ - η (2 (ξ - ξ₀) - Σ_j α_j k_j),   α = softmax(β·s(ξ)).

(The printed eq. 2 puts β outside a temperature-1 logsumexp, which leaves α of eq. 5 without β and a β
in eq. 4; here α is the read-out's association.) The two scalings are therefore the same module at the
same β', descent included.

and is then read out as ``α(ξ) V`` (eq. 6 as Ramsauer's update / hflayers' read-out: a value, not ξ).
``steps = 1`` therefore means *no* descent step: the one-step retrieval ``softmax(β·s(ξ₀)) V``, which is
what hflayers runs with ``update_steps_max=0``. Large β retrieves the value of the nearest stored
pattern. ``dropout`` drops association weights α before ``· V`` (training only).

hflayers options (the released profile: ``scaling: beta``, ``normalize: true``, ``heads: 6``,
``dropout: 0.1``, ``dim: 1024``):

* ``normalize``: affine LayerNorms on the state pattern (the query, before W_q), the stored pattern
  (bank rows before W_k) and the pattern projection (bank rows before W_v), each its own;
* ``heads``: W_q, W_k give ``heads`` association spaces of width d = ``dim`` each, W_v a value of width
  ``dim`` per head; each head retrieves on its own (its own descent and softmax), the heads' outputs are
  concatenated and an output projection maps them to the output width (hflayers' out_proj; the release's
  value width per head is 768 beside its 1024-wide association). With one head W_v maps straight to the
  output width (no output projection), the module as it always was.

The output width is the LLM's hidden size (paper 4,096).

``top_k > 0`` restricts every query (per head) to the k bank rows with the largest initial scores
ξ₀·k_j, found by a faiss inner-product search over the frozen bank (:mod:`amrg.models.memory_index`);
the descent and the read-out are then exact over those k rows. With ``normalize`` the index holds the
bank rows standardised without the affine part, z_j = (m_j - mean)/std, and the search query carries
the stored-pattern LayerNorm's gain: ξ·W_k(γ⊙z_j + b) = (γ ⊙ W_kᵀξ)·z_j + const, still exact while
W_k and γ train. Equal to the dense path when k >= n.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from .memory_index import MemoryIndex

if TYPE_CHECKING:
    from ..config import Hopfield

SCALINGS = ("beta_over_sqrt_d", "beta")


def hopfield_scores(xi: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None = None,
                    scaling: str = "beta_over_sqrt_d") -> torch.Tensor:
    """s(ξ), ``(..., n)``: ``ξKᵀ/√d`` (scaling ``beta_over_sqrt_d``) or ``ξKᵀ`` (``beta``); the logits
    are β·s(ξ). Where ``mask (..., n)`` is False the score is -inf (not a candidate)."""
    s = xi @ keys.T
    if scaling == "beta_over_sqrt_d":
        s = s / math.sqrt(keys.shape[-1])
    return s if mask is None else s.masked_fill(~mask, float("-inf"))


def effective_beta(beta: float, keys: torch.Tensor, scaling: str = "beta_over_sqrt_d") -> float:
    """β' with β'·ξKᵀ = β·s(ξ): the inverse temperature of the raw inner products, β/√d or β."""
    return beta / math.sqrt(keys.shape[-1]) if scaling == "beta_over_sqrt_d" else beta


def hopfield_association(xi: torch.Tensor, keys: torch.Tensor, beta: float, mask: torch.Tensor | None = None,
                         scaling: str = "beta_over_sqrt_d") -> torch.Tensor:
    """Eq. 5 with the module's one temperature: α = softmax(β·s(ξ)), ``(..., n)``."""
    return torch.softmax(beta * hopfield_scores(xi, keys, mask, scaling), dim=-1)


def hopfield_energy(xi: torch.Tensor, xi0: torch.Tensor, keys: torch.Tensor, beta: float,
                    mask: torch.Tensor | None = None, scaling: str = "beta_over_sqrt_d") -> torch.Tensor:
    """Eq. 2 per query: ``||ξ-ξ₀||² - β'⁻¹·logsumexp(β·s(ξ))`` (β': :func:`effective_beta`); shapes
    (..., d), (..., d), (n, d)."""
    lse = torch.logsumexp(beta * hopfield_scores(xi, keys, mask, scaling), dim=-1)
    return (xi - xi0).pow(2).sum(-1) - lse / effective_beta(beta, keys, scaling)


def hopfield_descent(xi0: torch.Tensor, keys: torch.Tensor, beta: float, eta: float, n_steps: int,
                     mask: torch.Tensor | None = None, scaling: str = "beta_over_sqrt_d") -> torch.Tensor:
    """``n_steps`` gradient steps (eq. 3-5) on the energy of eq. 2 (:func:`hopfield_energy`), from ξ₀:
    ∇E = 2(ξ-ξ₀) - α(ξ)K."""
    xi = xi0
    for _ in range(n_steps):
        grad = 2 * (xi - xi0) - hopfield_association(xi, keys, beta, mask, scaling) @ keys
        xi = xi - eta * grad
    return xi


def hopfield_retrieve(xi: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, beta: float,
                      mask: torch.Tensor | None = None, scaling: str = "beta_over_sqrt_d",
                      dropout: float = 0.0, training: bool = False) -> torch.Tensor:
    """Read-out ``dropout(α(ξ)) V`` with α = softmax(β·s(ξ)) (Ramsauer et al.'s update; eq. 6)."""
    alpha = hopfield_association(xi, keys, beta, mask, scaling)
    if dropout > 0 and training:
        alpha = F.dropout(alpha, dropout, training=True)
    return alpha @ values


class HopfieldRetrieval(nn.Module):
    """V-/R-Hopfield: learned projections θ over a fixed memory bank (registered, not saved).

    ``index`` (a dict of :class:`~amrg.models.memory_index.MemoryIndex` options) is used when
    ``0 < top_k < n``; the index is built lazily on the bank's device at the first forward.
    """

    def __init__(self, query_dim: int, memory: torch.Tensor, hidden_dim: int, out_dim: int,
                 beta: float = 4.0, steps: int = 1, eta: float = 0.1, top_k: int = 0, index: dict | None = None,
                 scaling: str = "beta_over_sqrt_d", normalize: bool = False, heads: int = 1, dropout: float = 0.0):
        super().__init__()
        if memory.ndim != 2 or memory.shape[0] == 0:
            raise ValueError(f"memory bank must be a non-empty (n, d) matrix, got {tuple(memory.shape)}")
        if not torch.isfinite(memory).all():
            raise ValueError("memory bank contains NaN or inf")
        if scaling not in SCALINGS:
            raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
        if heads < 1 or not 0.0 <= dropout < 1.0:
            raise ValueError(f"need heads >= 1 and 0 <= dropout < 1, got heads={heads}, dropout={dropout}")
        self.register_buffer("memory", memory.float(), persistent=False)
        width = memory.shape[1]
        # creation order q, k, v (then out): one head draws exactly the parameters it always did
        self.q_proj = nn.Linear(query_dim, heads * hidden_dim)
        self.k_proj = nn.Linear(width, heads * hidden_dim)
        self.v_proj = nn.Linear(width, out_dim if heads == 1 else heads * hidden_dim)
        self.out_proj = nn.Linear(heads * hidden_dim, out_dim) if heads > 1 else None
        # hflayers' normalize_state_pattern / normalize_stored_pattern / normalize_pattern_projection
        norm = (lambda n: nn.LayerNorm(n)) if normalize else (lambda n: nn.Identity())
        self.norm_state, self.norm_stored, self.norm_projection = norm(query_dim), norm(width), norm(width)
        self.beta, self.steps, self.eta, self.scaling = beta, steps, eta, scaling
        self.normalize, self.heads, self.dropout = normalize, heads, dropout
        self.top_k, self.index_options = (top_k if 0 < top_k < memory.shape[0] else 0), dict(index or {})
        self._index: MemoryIndex | None = None

    @classmethod
    def from_config(cls, cfg: "Hopfield", query_dim: int, memory: torch.Tensor, out_dim: int,
                    index: dict | None = None) -> "HopfieldRetrieval":
        """The module a ``hopfield`` params section describes, over ``memory``."""
        return cls(query_dim=query_dim, memory=memory, hidden_dim=cfg.dim, out_dim=out_dim, beta=cfg.beta,
                   steps=cfg.steps, eta=cfg.eta, top_k=cfg.top_k, index=index, scaling=cfg.scaling,
                   normalize=cfg.normalize, heads=cfg.heads, dropout=cfg.dropout)

    def forward(self, queries: torch.Tensor) -> torch.Tensor:
        """``(B, Q, query_dim)`` -> ``(B, Q, out_dim)``."""
        xi0 = self.q_proj(self.norm_state(queries))
        union, mask = self._rows(xi0)
        return self._associate(xi0, self.memory if union is None else self.memory[union], mask)

    def _rows(self, xi0: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The bank rows the queries see: (None, None) for the whole bank; with ``top_k``, the union U of
        every query's (and head's) candidates, projected once, and the mask ``(B, Q, H, |U|)`` of each query's
        own k rows of U, so the cost scales with |U| <= B·Q·H·k, not n."""
        if not self.top_k:
            return None, None
        ids = self.candidates(xi0).reshape(*xi0.shape[:-1], self.heads, -1)  # (B, Q, H, k), -1: not found
        found = ids >= 0
        union, where = ids[found].unique(return_inverse=True)
        mask = torch.zeros(*ids.shape[:-1], len(union), dtype=torch.bool, device=ids.device)
        query_of = torch.arange(found.shape[:-1].numel(), device=ids.device).view(*ids.shape[:-1], 1).expand_as(ids)
        mask.view(-1, len(union))[query_of[found], where] = True
        return union, mask

    @torch.no_grad()
    def association(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What each query retrieves, for people: the eq. 5 weights α over the bank at the read-out state
        (after the descent), averaged over the heads, ``(B, Q, m)``, and the bank row of each of the m
        columns (``(m,)``: every row, or with ``top_k`` the union of the candidates; -inf-masked rows weigh 0)."""
        xi0 = self.q_proj(self.norm_state(queries))
        union, mask = self._rows(xi0)
        rows = self.memory if union is None else self.memory[union]
        keys = self.k_proj(self.norm_stored(rows)).unflatten(-1, (self.heads, -1))
        xi0 = xi0.unflatten(-1, (self.heads, -1))
        alpha = 0
        for h in range(self.heads):
            m = None if mask is None else mask[..., h, :]
            xi = hopfield_descent(xi0[..., h, :], keys[:, h], self.beta, self.eta, self.steps - 1, m, self.scaling)
            alpha = alpha + hopfield_association(xi, keys[:, h], self.beta, m, self.scaling) / self.heads
        ids = torch.arange(len(self.memory), device=rows.device) if union is None else union
        return alpha, ids

    def _associate(self, xi0: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Per head: descent (eq. 3-5) and read-out over the bank ``rows``; heads concatenated, projected
        out. ``mask (B, Q, H, n)``: each query's and head's candidates (None: every row)."""
        keys = self.k_proj(self.norm_stored(rows)).unflatten(-1, (self.heads, -1))  # (n, H, d)
        values = self.v_proj(self.norm_projection(rows)).unflatten(-1, (self.heads, -1))  # (n, H, d_v)
        xi0 = xi0.unflatten(-1, (self.heads, -1))  # (B, Q, H, d)
        out = []
        for h in range(self.heads):
            m = None if mask is None else mask[..., h, :]
            xi = hopfield_descent(xi0[..., h, :], keys[:, h], self.beta, self.eta, self.steps - 1, m, self.scaling)
            out.append(hopfield_retrieve(xi, keys[:, h], values[:, h], self.beta, m, self.scaling,
                                         self.dropout, self.training))
        return out[0] if self.out_proj is None else self.out_proj(torch.cat(out, dim=-1))

    @torch.no_grad()
    def candidates(self, xi0: torch.Tensor) -> torch.Tensor:
        """Bank rows with the top-k scores ξ₀·k_j per query, ``(B, Q, k)`` (several heads: per head,
        ``(B, Q, H, k)``): an inner-product search of ``W_kᵀ ξ₀`` (times the stored-pattern LayerNorm's
        gain with ``normalize``) over the raw (with ``normalize``: standardised) bank; -1 where an
        approximate index found fewer."""
        if self._index is None:
            bank = self.memory
            if self.normalize:
                bank = F.layer_norm(bank, bank.shape[-1:], eps=self.norm_stored.eps)
            self._index = MemoryIndex(bank, **self.index_options)
        xi = xi0.reshape(-1, self.heads, xi0.shape[-1] // self.heads).float()
        weight = self.k_proj.weight.float().unflatten(0, (self.heads, -1))  # (H, d, d_m)
        query = torch.stack([xi[:, h] @ weight[h] for h in range(self.heads)], dim=1)  # (N, H, d_m)
        if self.normalize:
            query = query * self.norm_stored.weight.float()
        found = self._index.search(query.reshape(-1, query.shape[-1]), self.top_k)
        return found.reshape(*xi0.shape[:-1], *((self.heads,) if self.heads > 1 else ()), -1)
