"""Bidirectional visual representation learning with a frozen LLM (seed 004): VTC + TVC + REC.

``L = vtc_weight * L_VTC + tvc_weight * L_TVC + rec_weight * L_REC`` (paper eq. 3, weights 1, 1, 1).
The three terms regularise E_v, the visual tokens F as the LLM sees them
(:meth:`~amrg.models.generator.ReportGenerator.visual_embeds`: the generator's visual mapper; amrg's
vision encoder is the frozen stage-1 classifier, so the mapper is what they train, and a generator-side
vision encoder would sit behind the same seam).

- **VTC** (vision -> text, eq. 1) is the report log-likelihood the generator already trains (eq. 12).
- **TVC** (text -> vision, eq. 2), :class:`TextToVision`. Per study and view: the report goes through a
  text encoder (any HF encoder, ``generator.tvc_text_encoder``) and the T-mapper (LayerNorm + Linear to
  the LLM width), giving E_t; the LLM input is ``[E_t, view token, S_t2v, X]`` with S_t2v the token
  embeddings of ``generator.tvc_prompt`` and X either the view's E_v shifted by one (teacher forcing:
  E_g,i is read at the position where E_v,<i was fed, so it never sees E_v,>=i) or T learned
  placeholder queries. The LLM runs with every weight **detached** (:func:`frozen_hidden_states`), so it
  gets no gradient from TVC even when ``llm.trainable`` is ``full`` or ``lora``; gradients reach the text
  side through its activations. E_g is the read-out (``linear``: a learned Linear; ``hidden``: the
  identity) of its last hidden states at the last T positions, and ``L_TVC = mean_i ||E_v,i - E_g,i||^2``
  (squared L2 over the hidden width, mean over tokens, views and studies, as eq. 2). Following eq. 5,
  E_g depends on the text side only: the teacher-forced inputs are detached; the target E_v carries
  gradient to the visual mapper unless ``generator.tvc_stop_grad``.
- **REC** (image reconstruction), :class:`VisualReconstruction`: E_v -> Linear (m'_v) -> position
  embedding -> ``rec_depth`` pre-norm transformer blocks -> one ``rec_patch x rec_patch`` pixel patch
  per visual token (MAE-style), i.e. each view at (token grid x rec_patch) pixels; the target is the
  view's pixels in [0, 1], area-downsampled to that size (:func:`reconstruction_targets`), and
  ``L_REC`` is the pixel MSE (eq. in the REC paragraph: mean over pixels, views and studies).

Everything here is training-only: :class:`Bidirectional` wraps the generator and these heads for
:func:`amrg.train.fit`, the heads' weights are written apart from the generator's
(``generator/auxiliary.safetensors``, never read by inference), and generation never runs them. A term
whose weight is 0 builds no module, and :func:`build_auxiliary` builds under a forked RNG, so the
generator's initialisation and the training RNG stream are those of a VTC-only run.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.func import functional_call

from .hub import resolve_model_ref

if TYPE_CHECKING:
    from ..config import Generator

log = logging.getLogger(__name__)

AUXILIARY_WEIGHTS = "auxiliary.safetensors"  # beside generator/weights.safetensors; inference never reads it


def pooled_grid(grid: tuple[int, int], pool: int) -> tuple[int, int]:
    """The per-view token grid after :func:`amrg.models.features.study_features`' ceil-mode pooling."""
    return math.ceil(grid[0] / pool), math.ceil(grid[1] / pool)


def _decoder(llm: nn.Module) -> nn.Module:
    """The transformer body of a causal LM (no LM head): ``get_decoder()`` (Llama, a peft-wrapped LM),
    else ``base_model`` (GPT-2's ``transformer``)."""
    get = getattr(llm, "get_decoder", None)
    decoder = get() if callable(get) else None
    return decoder if decoder is not None else llm.base_model


def frozen_hidden_states(llm: nn.Module, embeds: torch.Tensor, mask: torch.Tensor,
                         position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The LLM's last hidden states on ``inputs_embeds``, computed with every LLM weight detached
    (``torch.func.functional_call``): gradients flow to ``embeds`` only, never into the LLM, whatever
    ``llm.trainable`` is. The pass runs in eval mode (no dropout and no activation checkpointing: a
    checkpointed layer would recompute with the live weights in backward)."""
    decoder = _decoder(llm)
    detached = {n: p.detach() for n, p in decoder.named_parameters()}
    was_training = decoder.training
    decoder.eval()
    try:
        out = functional_call(decoder, detached, args=(), kwargs=dict(
            inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, use_cache=False))
    finally:
        decoder.train(was_training)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def tvc_loss(generated: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """eq. 2: ``(1/N_p) sum_i ||E_v,i - E_g,i||^2``, also averaged over the batch."""
    return (target.float() - generated.float()).pow(2).sum(-1).mean()


def rec_loss(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pixel MSE ``(1/CHW) sum ||I - I_hat||^2``, also averaged over views and the batch."""
    return (target.float() - reconstruction.float()).pow(2).mean()


class TextToVision(nn.Module):
    """The text-to-vision branch: text encoder + T-mapper (+ view token, placeholder queries, read-out)."""

    def __init__(self, text_encoder: str, hidden: int, prompt_ids: list[int], n_views: int, tokens_per_view: int, *,
                 trainable: bool = True, view_token: bool = True, teacher_forcing: bool = True,
                 readout: str = "linear", stop_grad: bool = False):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        path = resolve_model_ref(text_encoder)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "right"
        self.encoder = AutoModel.from_pretrained(path)
        if getattr(self.encoder, "pooler", None) is not None:
            self.encoder.pooler = None  # unused: hidden states only (and no parameter without a gradient)
        self.encoder.requires_grad_(trainable)
        self.text_trainable = trainable
        width = self.encoder.config.hidden_size
        self.mapper = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden))  # m_t
        self.view = nn.Embedding(n_views, hidden) if view_token else None
        self.queries = None if teacher_forcing else nn.Parameter(torch.randn(tokens_per_view, hidden) * 0.02)
        self.readout = nn.Linear(hidden, hidden) if readout == "linear" else None
        self.n_views, self.tokens_per_view, self.stop_grad = n_views, tokens_per_view, stop_grad
        self.register_buffer("prompt_ids", torch.tensor(prompt_ids, dtype=torch.long), persistent=False)

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.text_trainable:
            self.encoder.eval()  # a frozen encoder is a fixed function (no dropout)
        return self

    def tokenize(self, texts: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    def forward(self, llm: nn.Module, text_ids: torch.Tensor, text_mask: torch.Tensor,
                visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(E_g, target E_v), both ``(B, n_views * T, hidden)``, for the reports ``text_ids`` (right-padded)
        and E_v ``visual`` of the same studies."""
        b, v, t = visual.shape[0], self.n_views, self.tokens_per_view
        hidden = visual.shape[-1]
        target = visual.detach() if self.stop_grad else visual
        e_t = self.mapper(self.encoder(input_ids=text_ids, attention_mask=text_mask).last_hidden_state)
        rows = b * v  # one sequence per (study, view), study-major as E_v's views are
        parts = [e_t.repeat_interleave(v, 0)]
        if self.view is not None:
            parts.append(self.view.weight.repeat(b, 1).unsqueeze(1))
        with torch.no_grad():
            prompt = llm.get_input_embeddings()(self.prompt_ids)
        parts.append(prompt.unsqueeze(0).expand(rows, -1, -1))
        if self.queries is None:
            parts.append(visual.detach().reshape(rows, t, hidden)[:, :-1])  # teacher forcing: E_v,<i
        else:
            parts.append(self.queries.unsqueeze(0).expand(rows, -1, -1))
        dtype = prompt.dtype
        embeds = torch.cat([p.to(dtype) for p in parts], dim=1)
        n_fixed = embeds.shape[1] - text_mask.shape[1]
        mask = torch.cat([text_mask.repeat_interleave(v, 0),
                          torch.ones(rows, n_fixed, dtype=text_mask.dtype, device=text_mask.device)], dim=1)
        position_ids = (mask.cumsum(1) - 1).clamp(min=0)  # contiguous across the text's padding
        h = frozen_hidden_states(llm, embeds, mask, position_ids)[:, -t:].float()
        # teacher forcing: position -t is the last prompt token, predicting E_v,0; queries: the T queries
        e_g = self.readout(h) if self.readout is not None else h
        return e_g.reshape(b, v * t, hidden), target


class VisualReconstruction(nn.Module):
    """REC: E_v -> one pixel patch per visual token, each view as a ``(gh * patch, gw * patch)`` image."""

    def __init__(self, hidden: int, n_views: int, grid: tuple[int, int], patch: int, dim: int, depth: int, heads: int):
        super().__init__()
        self.n_views, self.grid, self.patch = n_views, tuple(grid), patch
        n_tokens = grid[0] * grid[1]
        self.mapper = nn.Linear(hidden, dim)  # m'_v
        self.pos = nn.Parameter(torch.randn(n_tokens, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False) if depth else None
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, patch * patch)

    @property
    def image_size(self) -> tuple[int, int]:
        return self.grid[0] * self.patch, self.grid[1] * self.patch

    def forward(self, visual: torch.Tensor) -> torch.Tensor:
        """E_v ``(B, n_views * T, hidden)`` -> reconstructions ``(B, n_views, gh * patch, gw * patch)``."""
        b, (gh, gw), p = visual.shape[0], self.grid, self.patch
        x = self.mapper(visual.reshape(b * self.n_views, gh * gw, -1)) + self.pos
        if self.blocks is not None:
            x = self.blocks(x)
        x = self.head(self.norm(x))  # (B * V, T, p * p), tokens row-major over the grid
        x = x.reshape(b, self.n_views, gh, gw, p, p).permute(0, 1, 2, 4, 3, 5)  # (.., row, y, col, x)
        return x.reshape(b, self.n_views, gh * p, gw * p)


@torch.no_grad()
def reconstruction_targets(pixels: torch.Tensor, view_rows, size: tuple[int, int], batch: int = 256) -> torch.Tensor:
    """REC targets: the views ``view_rows (S, V)`` of uint8 ``pixels (N, H, W)`` in [0, 1], area-downsampled
    to ``size``: ``(S, V, *size)`` float32."""
    rows = torch.as_tensor(view_rows).reshape(-1)
    out = [nn.functional.interpolate(pixels[rows[s:s + batch]].float().unsqueeze(1) / 255.0, size=tuple(size),
                                     mode="area").squeeze(1) for s in range(0, len(rows), batch)]
    return torch.cat(out).reshape(*torch.as_tensor(view_rows).shape, *size)


class AuxiliaryObjectives(nn.Module):
    """The training-only heads of the terms that are on (``tvc``, ``rec``: a module or None)."""

    def __init__(self, tvc: TextToVision | None, rec: VisualReconstruction | None, text_max_tokens: int = 128):
        super().__init__()
        self.tvc, self.rec, self.text_max_tokens = tvc, rec, text_max_tokens

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.tvc.tokenize(texts, self.text_max_tokens) if self.tvc is not None else None

    def wrap(self, generator: nn.Module) -> "Bidirectional":
        return Bidirectional(generator, self)


class Bidirectional(nn.Module):
    """What :func:`amrg.train.fit` trains when an auxiliary term is on: the generator (``generator.*``)
    and the heads (``aux.*``); the forward pass returns every term's loss."""

    def __init__(self, generator: nn.Module, aux: AuxiliaryObjectives):
        super().__init__()
        self.generator, self.aux = generator, aux

    def forward(self, visual_tokens, disease_features, report_ids, report_mask, text=None,
                rec_target=None, input_ids=None) -> dict[str, torch.Tensor]:
        e_v = self.generator.visual_embeds(visual_tokens)
        out = {"vtc": self.generator(visual_tokens, disease_features, report_ids, report_mask, visual=e_v,
                                     input_ids=input_ids)}
        if self.aux.tvc is not None:
            out["tvc"] = tvc_loss(*self.aux.tvc(self.generator.llm, *text, e_v))
        if self.aux.rec is not None:
            out["rec"] = rec_loss(self.aux.rec(e_v), rec_target)
        return out

    @staticmethod
    def split_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """fit's weights -> (the generator's, with its own names as weights.safetensors holds them; the heads')."""
        parts: tuple[dict, dict] = ({}, {})
        for k, v in state.items():
            head, _, rest = k.partition(".")
            parts[head != "generator"][rest if head == "generator" else k] = v
        return parts


def build_auxiliary(g: "Generator", generator: nn.Module, n_views: int, grid: tuple[int, int],
                    seed: int) -> AuxiliaryObjectives | None:
    """The heads of the terms whose weight is > 0 (None when TVC and REC are both off: nothing is built),
    on ``generator``'s device, initialised from their own RNG (``seed``) so the global RNG stream is
    untouched. ``grid`` is the per-view visual token grid (:func:`pooled_grid`)."""
    if not (g.tvc_weight > 0 or g.rec_weight > 0):
        return None
    hidden = generator.llm.config.hidden_size
    tokens_per_view = grid[0] * grid[1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tvc = rec = None
        if g.tvc_weight > 0:
            prompt_ids = generator.tokenizer(g.tvc_prompt, add_special_tokens=False)["input_ids"]
            if generator.tokenizer.unk_token_id is not None and generator.tokenizer.unk_token_id in prompt_ids:
                log.warning("generator.tvc_prompt has words the LLM's tokenizer does not know (<unk>): %r",
                            g.tvc_prompt)
            tvc = TextToVision(g.tvc_text_encoder, hidden, prompt_ids, n_views, tokens_per_view,
                               trainable=g.tvc_text_trainable, view_token=g.tvc_view_token,
                               teacher_forcing=g.tvc_teacher_forcing, readout=g.tvc_readout, stop_grad=g.tvc_stop_grad)
        if g.rec_weight > 0:
            rec = VisualReconstruction(hidden, n_views, grid, g.rec_patch, g.rec_dim, g.rec_depth, g.rec_heads)
        aux = AuxiliaryObjectives(tvc, rec, g.tvc_text_max_tokens)
    return aux.to(next(generator.parameters()).device)
