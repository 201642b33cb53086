"""Q-Former (paper III-B): learned disease queries read the image tokens.

With ``n_queries = 14`` each query is one CheXpert observation (paper: Q_d in R^{14 x 768}); its output
is that disease's feature F_d. Two implementations with one interface (image tokens ``(B, N, C)`` ->
F_d ``(B, n_queries, dim)``, the queries as the parameter ``.queries``), built by :func:`build_qformer`:

- ``scratch`` (:class:`QFormer`): ``layers`` pre-norm blocks of self-attention over the queries,
  cross-attention to the image tokens and a feed-forward network; no dropout, random init.
- ``blip2`` (:class:`Blip2QFormer`): BLIP-2's Q-Former, transformers' ``Blip2QFormerModel`` (post-norm
  BERT layers, cross-attention every ``cross_attention_frequency``-th layer, dropout), randomly
  initialised or loaded from a Q-Former / BLIP-2 checkpoint (BLIP-2: 12 layers, 768 wide, 12 heads).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel, PretrainedConfig

from .hub import resolve_model_ref

FFN_MULT = 4  # feed-forward width / model width (BERT's and BLIP-2's 3072 / 768)


class QFormerBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm_self, self.norm_cross, self.norm_ffn = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, FFN_MULT * dim), nn.GELU(), nn.Linear(FFN_MULT * dim, dim))

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


class Blip2QFormer(nn.Module):
    """BLIP-2's Q-Former reading the image tokens with the ``n_queries`` learned disease queries.

    The image tokens ``(B, N, C)`` are projected (LayerNorm + Linear) to the Q-Former's
    ``encoder_hidden_size`` and given as ``encoder_hidden_states``; the queries are its
    ``query_embeds``. F_d is the last hidden state ``(B, n_queries, hidden_size)`` (already layer-normed
    by the last post-norm layer). BLIP-2's own 32 query tokens are not used: the 14 disease queries are
    new, drawn like BLIP-2's (normal, std ``initializer_range``).
    """

    def __init__(self, token_dim: int, model: Blip2QFormerModel, n_queries: int = 14):
        super().__init__()
        cfg = model.config
        self.queries = nn.Parameter(torch.randn(n_queries, cfg.hidden_size) * cfg.initializer_range)
        self.token_proj = nn.Sequential(nn.LayerNorm(token_dim), nn.Linear(token_dim, cfg.encoder_hidden_size))
        self.model = model

    @property
    def config_dict(self) -> dict:
        """The Q-Former's ``Blip2QFormerConfig`` (what rebuilding it needs without the checkpoint: the
        values that differ from the defaults) and, when loaded, the checkpoint it came from."""
        cfg = self.model.config
        return cfg.to_diff_dict() | ({"_name_or_path": cfg.name_or_path} if cfg.name_or_path else {})

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Image tokens ``(B, N, C)`` -> disease features ``(B, n_queries, hidden_size)``."""
        q = self.queries.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        return self.model(query_embeds=q, encoder_hidden_states=self.token_proj(tokens)).last_hidden_state


def blip2_config(dim: int, layers: int, heads: int, cross_attention_frequency: int) -> Blip2QFormerConfig:
    """A ``Blip2QFormerConfig`` of the given size (BLIP-2's defaults otherwise: dropout 0.1, eps 1e-12);
    the image tokens are projected to ``dim``."""
    return Blip2QFormerConfig(hidden_size=dim, num_hidden_layers=layers, num_attention_heads=heads,
                              intermediate_size=FFN_MULT * dim, cross_attention_frequency=cross_attention_frequency,
                              encoder_hidden_size=dim)


def load_blip2_qformer(ref: str) -> Blip2QFormerModel:
    """``Blip2QFormerModel`` from ``ref`` (HF id, local dir or ``pkg:``: :func:`~amrg.models.hub.resolve_model_ref`):
    a Q-Former saved on its own, or a whole BLIP-2 checkpoint, whose Q-Former config is its
    ``qformer_config`` and whose weights are those under ``qformer.`` (the rest is not kept). Raises if
    any Q-Former weight is missing from the checkpoint (transformers would initialise it randomly)."""
    path = resolve_model_ref(ref)
    whole_blip2 = PretrainedConfig.get_config_dict(path)[0].get("model_type") == "blip-2"
    model, info = Blip2QFormerModel.from_pretrained(
        path, output_loading_info=True, key_mapping={r"^qformer\.": ""} if whole_blip2 else None)
    missing = sorted(info["missing_keys"])
    if missing:
        raise ValueError(f"qformer.pretrained={ref}: {len(missing)} Q-Former weights are not in the checkpoint "
                         f"(e.g. {missing[0]}): not a Blip2QFormerModel or BLIP-2 checkpoint")
    return model.train()  # from_pretrained hands it over in eval mode; a new module is in training mode


def build_qformer(token_dim: int, kind: str = "scratch", dim: int = 768, layers: int = 2, heads: int = 8,
                  n_queries: int = 14, cross_attention_frequency: int = 2, config: dict | None = None,
                  pretrained: str | None = None) -> nn.Module:
    """The Q-Former ``kind`` (``qformer.kind``) reading ``token_dim``-wide image tokens.

    ``blip2``: from ``config`` (a saved ``Blip2QFormerConfig`` dict: rebuild, random weights to be
    overwritten), else ``pretrained`` (:func:`load_blip2_qformer`; its size must be
    ``dim``/``layers``/``heads``/``cross_attention_frequency``), else a random init of
    :func:`blip2_config`.
    """
    if kind == "scratch":
        if pretrained is not None or config is not None:
            raise ValueError("qformer.kind=scratch has no pretrained weights or config: use qformer.kind=blip2")
        return QFormer(token_dim, dim, layers, heads, n_queries)
    if kind != "blip2":
        raise ValueError(f"unknown qformer.kind {kind!r}: scratch | blip2")
    if config is not None:
        model = Blip2QFormerModel(Blip2QFormerConfig.from_dict(config))
    elif pretrained is not None:
        model = load_blip2_qformer(pretrained)
    else:
        model = Blip2QFormerModel(blip2_config(dim, layers, heads, cross_attention_frequency))
    c = model.config
    got = {"dim": c.hidden_size, "layers": c.num_hidden_layers, "heads": c.num_attention_heads,
           "cross_attention_frequency": c.cross_attention_frequency}
    want = {"dim": dim, "layers": layers, "heads": heads, "cross_attention_frequency": cross_attention_frequency}
    if got != want:
        bad = ", ".join(f"qformer.{k}: {got[k]}" for k in got if got[k] != want[k])
        raise ValueError(f"the BLIP-2 Q-Former ({pretrained or 'saved config'}) has {bad}: set those params to match")
    return Blip2QFormer(token_dim, model, n_queries)


def orthogonality_loss(rows: torch.Tensor) -> torch.Tensor:
    """Mean squared off-diagonal cosine similarity of ``n`` rows (eq. 11's second term).

    With Q̂ the row-normalised rows (n x d): L_orth = ||Q̂ Q̂ᵀ - I||_F² / (n (n - 1)). It is 0 iff the
    rows are mutually orthogonal and 1 when they are all parallel. ``rows`` is the disease queries
    ``(n, d)`` or a batch ``(B, n, d)`` (each image's disease features F_d): then the mean over the batch.
    """
    qn = nn.functional.normalize(rows, dim=-1)
    n = qn.shape[-2]
    gram = qn @ qn.transpose(-1, -2)
    off = gram - torch.eye(n, device=qn.device, dtype=qn.dtype)
    return off.pow(2).sum((-2, -1)).mean() / (n * (n - 1))
