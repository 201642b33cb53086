"""Autoregressive pre-training of a Vision-Mamba encoder: seed 002's stage #1 (CXPMRG-Bench, issue 17).

The paper writes the objective as eq. 2, ``L_AR = Σ_i | Vim([T_1..T_i]) - T_{i+1} |²`` (the next token
embedding); the released code (``pretrain/models_pretrain.py``, ARM's; Ren et al. 2024) trains something
else, and :class:`ARMPretrainer` does what it does (``target: pixels``):

1. the ``g x g`` token grid (patch embedding + fixed 2-D sin-cos positions) is regrouped into
   ``cluster x cluster``-token clusters in cluster-major order (``rearrange(b (h p1) (w p2) c ->
   b (h w) (p1 p2) c)``): ``K = (g/cluster)²`` clusters of ``T = cluster²`` tokens;
2. the encoder (one causal scan: the pretrain form of :mod:`amrg.models.vim`) reads clusters ``1..K-1``
   as one sequence; the outputs of 4 of its layers (``feature_layers``, 1-based; ``[]``:
   ``ceil(depth*j/6)``, j = 3..6, i.e. 6/8/10/12 at depth 12 and 12/16/20/24 at depth 24, the release's
   ``skip``) are each LayerNorm'd, concatenated (4C) and mapped by ``enc2dec`` ``Linear(4C -> depth_dec *
   dec)``; the result, read as ``(dec, depth_dec)`` per token as the release reshapes it, gives decoder
   block k its own key/value sequence (chunk k);
3. the decoder's queries are a learned ``ar_token`` plus fixed 2-D sin-cos positions (``dec``-wide) of the
   tokens of clusters ``2..K``; each block is ``q + CrossAttn(LN q, LN kv)`` then ``q + MLP(LN q)`` (GELU,
   ratio 4), under a block-causal mask: the query of target cluster t attends to encoder clusters < t only,
   so (the scan being causal) no prediction sees the cluster it predicts;
4. ``ar_norm`` then ``ar_pred`` ``Linear(dec -> p*p*3)``; the loss is the MSE to the next cluster's pixels
   (the encoder's normalised input, patchified), each patch normalised (:func:`norm_pix`; the release
   always applies it; ``norm_pix: false`` regresses the raw values).

``target: tokens`` is eq. 2 read literally: the same encoder/decoder regresses the patch embeddings
``T_i`` (the conv tokens before positions, detached, so the embedding cannot collapse to satisfy it) of
the next cluster, ``ar_pred`` being ``Linear(dec -> C)``; ``cluster: 1`` makes it token by token. With
``decoder_depth`` other than 4 the fusion maps to ``decoder_depth`` chunks, one per block (the release:
4 and 4). Everything is batched over tokens; the only Python loops run over layers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

from .pixel_head import norm_pix, patchify
from .vim import INIT_STD, VisionMamba, sincos_2d

TARGETS = ("pixels", "tokens")
N_FEATURES = 4  # encoder layers fused for the decoder (the release's 4 LayerNorms)
MLP_RATIO = 4.0  # the decoder blocks' MLP width (the release's DecoderBlock(..., 4))


def default_feature_layers(depth: int) -> list[int]:
    """The release's ``skip``: ``ceil(depth*j/6)`` for j = 3..6 (1-based layer numbers)."""
    return [math.ceil(depth * j / 6) for j in range(3, 7)]


def cluster_major(x: torch.Tensor, grid: tuple[int, int], cluster: int) -> torch.Tensor:
    """Row-major tokens ``(B, H*W, D)`` -> ``(B, K, cluster², D)``: ``cluster x cluster`` blocks, the blocks
    row-major, the tokens row-major inside each (``b (h p1) (w p2) c -> b (h w) (p1 p2) c``)."""
    h, w = grid
    b, _, d = x.shape
    x = x.reshape(b, h // cluster, cluster, w // cluster, cluster, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // cluster) * (w // cluster), cluster * cluster, d)


def block_causal_mask(clusters: int, tokens: int, device=None) -> torch.Tensor:
    """bool ``(clusters*tokens, clusters*tokens)``, True where attention is allowed: query cluster i (target
    cluster i+1) sees key clusters 0..i (encoder clusters before its target), as the release's mask."""
    c = torch.arange(clusters * tokens, device=device) // tokens
    return c[None, :] <= c[:, None]


class CrossAttention(nn.Module):
    """Multi-head attention of queries on a separate key/value sequence (the release's ``CrossAttention``)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)

    def forward(self, q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, d = q.shape
        q = self.q(q).view(b, n, self.heads, d // self.heads).transpose(1, 2)
        k, v = self.kv(kv).view(b, kv.shape[1], 2, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class DecoderBlock(nn.Module):
    """``q + attn(norm2_1 q, norm2_2 kv)`` then ``q + mlp(norm2 q)`` (the release's names)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attn2 = CrossAttention(dim, heads)
        self.norm2_1, self.norm2_2, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        hidden = int(dim * MLP_RATIO)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q = q + self.attn2(self.norm2_1(q), self.norm2_2(kv), mask)
        return q + self.mlp(self.norm2(q))


class ARMPretrainer(nn.Module):
    """The encoder (kept as :attr:`encoder`, the weights stage #1 writes) plus ARM's decoder; ``forward(x)``
    takes the encoder's normalised input ``(B, 3, S, S)`` and returns the scalar loss."""

    def __init__(self, encoder: VisionMamba, cluster: int = 4, feature_layers: list[int] | tuple = (),
                 decoder_dim: int = 512, decoder_depth: int = 4, decoder_heads: int = 8, target: str = "pixels",
                 norm_pix_loss: bool = True):
        super().__init__()
        check_encoder(encoder)
        if target not in TARGETS:
            raise ValueError(f"unknown ARM target {target!r}; choose from {list(TARGETS)}")
        grid, depth = encoder.grid, len(encoder.layers)
        if cluster < 1 or grid[0] % cluster or grid[1] % cluster:
            raise ValueError(f"ARM cluster {cluster} does not divide the {grid[0]}x{grid[1]} token grid")
        self.clusters = (grid[0] // cluster) * (grid[1] // cluster)
        if self.clusters < 2:
            raise ValueError(f"ARM needs at least 2 clusters; a {grid} grid in {cluster}x{cluster} clusters has 1")
        layers = list(feature_layers) or default_feature_layers(depth)
        if len(layers) != N_FEATURES or not all(1 <= int(i) <= depth for i in layers):
            raise ValueError(f"ARM feature_layers must be {N_FEATURES} layer numbers in 1..{depth}; got {layers}")
        if decoder_dim % decoder_heads:
            raise ValueError(f"ARM decoder_dim {decoder_dim} is not divisible by decoder_heads {decoder_heads}")
        self.encoder, self.cluster, self.feature_layers = encoder, cluster, [int(i) for i in layers]
        self.target, self.norm_pix_loss = target, norm_pix_loss
        self.decoder_dim, self.decoder_depth = decoder_dim, decoder_depth
        self.patch, c = encoder.patch_embed.patch_size[0], encoder.embed_dim
        self.tokens_per_cluster = cluster * cluster
        self.feature_norms = nn.ModuleList([nn.LayerNorm(c) for _ in self.feature_layers])
        self.enc2dec = nn.Linear(N_FEATURES * c, decoder_depth * decoder_dim)
        self.ar_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        trunc_normal_(self.ar_token, std=INIT_STD)
        pos = cluster_major(sincos_2d(decoder_dim, grid)[None], grid, cluster)[:, 1:].flatten(1, 2)
        self.register_buffer("dec_pos_embed", pos, persistent=False)
        self.register_buffer("mask", block_causal_mask(self.clusters - 1, self.tokens_per_cluster), persistent=False)
        self.dec_block = nn.ModuleList([DecoderBlock(decoder_dim, decoder_heads) for _ in range(decoder_depth)])
        self.dec_block.apply(_xavier)
        self.ar_norm = nn.LayerNorm(decoder_dim)
        out = self.patch * self.patch * encoder.in_chans if target == "pixels" else c
        self.ar_pred = nn.Linear(decoder_dim, out)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder's keys/values ``(B, (K-1)T, dec, depth_dec)`` from clusters 0..K-2, and the patch
        embeddings ``(B, N, C)`` (eq. 2's tokens)."""
        enc = self.encoder
        tokens = enc.patch_embed(x)
        h = tokens + enc.pos_embed if enc.pos_embed_kind != "none" else tokens
        h = cluster_major(enc.pos_drop(h), enc.grid, self.cluster)[:, :-1].flatten(1, 2)
        kept: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(enc.layers, start=1):
            if enc.grad_checkpointing and torch.is_grad_enabled():
                h = checkpoint(layer, h, None, None, use_reentrant=False)
            else:
                h = layer(h, None, None)
            if i in self.feature_layers:
                kept[i] = h
        fused = torch.cat([norm(kept[i]) for norm, i in zip(self.feature_norms, self.feature_layers)], dim=-1)
        kv = self.enc2dec(fused)
        return kv.view(*kv.shape[:2], self.decoder_dim, self.decoder_depth), tokens

    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Predictions ``(B, (K-1)T, out)`` for the tokens of clusters 1..K-1 (cluster-major) and the patch
        embeddings ``(B, N, C)``."""
        kv, tokens = self.encode(x)
        q = (self.ar_token + self.dec_pos_embed).expand(x.shape[0], -1, -1)
        for k, block in enumerate(self.dec_block):
            q = block(q, kv[..., k], self.mask)
        return self.ar_pred(self.ar_norm(q)), tokens

    def targets(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """What :meth:`predict` regresses, ``(B, (K-1)T, out)``: next-cluster (normalised) pixels or tokens."""
        if self.target == "pixels":
            t = patchify(x, self.patch)
            t = norm_pix(t) if self.norm_pix_loss else t
        else:
            t = tokens.detach()
        return cluster_major(t, self.encoder.grid, self.cluster)[:, 1:].flatten(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pred, tokens = self.predict(x)
        return F.mse_loss(pred.float(), self.targets(x, tokens).float())


def check_encoder(encoder: VisionMamba) -> None:
    """ARM needs the pretrain form: no class token and a causal (``forward``) scan in every block."""
    if not isinstance(encoder, VisionMamba):
        raise TypeError(f"ARM pre-trains an amrg VisionMamba, got {type(encoder).__name__}")
    if encoder.cls_index is not None:
        raise ValueError("ARM needs the Vim pretrain form: cls_position none (the release has no class token)")
    scans = {layer.mixer.scan for layer in encoder.layers}
    if scans != {"forward"}:
        raise ValueError(f"ARM needs a causal scan (scan: forward, the pretrain form); the encoder scans {sorted(scans)}")


def _xavier(m: nn.Module) -> None:
    """The release's decoder init (JAX ViT's): xavier-uniform Linear weights, zero biases."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        nn.init.zeros_(m.bias)
