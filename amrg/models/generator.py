"""Associative-memory report generator (paper III-C/D, eq. 8-10, 12).

Per study the LLM reads ``[BOS, text before, F, Q, F', text after]`` then the report + EOS, all as
``inputs_embeds``: the texts are the ``generator.prompt_template`` around its ``{image}``, with
``{prompt}`` replaced by the prompt (default ``"{image} {prompt}"``: [BOS, F, Q, F', prompt]; R2GenGPT's and
the released code's chat wrapper ``"Human: <Img>{image}</Img> {prompt} \\nAssistant:"``). The image part is
the projected visual tokens F (both views, or their mean: :func:`amrg.models.features.visual_tokens`),
the Q-Former query tokens Q (the 14 disease features F_d projected; none with ``generator.query_tokens``
false) and the enhanced tokens F' = per disease [V-Hopfield(F_d[k]), R-Hopfield(F_d[k])] (eq. 8-9, 2 x 14
rows), optionally under one LayerNorm (``generator.embed_norm``, the released code's ``layer_norm``). The loss covers report tokens only
(eq. 12). Ablations: a Hopfield whose bank is ``None`` is switched off (Table IV rows #01-#04).
``hopfield.top_k`` with ``index`` (the ``banks.index`` options) retrieves from each bank's faiss top-k
instead of the whole bank. Seed 004's
training-only objectives (:mod:`amrg.models.bidirectional`) regularise :meth:`ReportGenerator.visual_embeds`
from outside this module; generation never runs them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..config import DEFAULT_TEMPLATE, TEMPLATE_IMAGE, TEMPLATE_PROMPT
from .hopfield import HopfieldRetrieval

if TYPE_CHECKING:
    from ..config import BankIndex, Hopfield, Llm

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def llm_dtype(llm, precision: str, device: torch.device) -> str:
    """The LLM's weight dtype (the dtype policy): a frozen or LoRA-adapted LLM is held in bf16 when the
    run uses bf16 on CUDA (a 7B base in fp32 would need ~28 GB); a fully trained LM stays fp32 (its
    optimizer updates need full-precision weights), as does everything on CPU."""
    return "bf16" if precision == "bf16" and device.type == "cuda" and llm.trainable != "full" else "fp32"


@dataclass(frozen=True)
class VisionSpec:
    """The generator-side vision encoder whose tokens F the LLM reads (``generator_vision``, seed 002 C0/C4):
    ``source`` pretrained | timm, the timm ``name`` and ``kwargs`` it is built with, the ``image_size`` it
    reads (the view pixels are resized to it on the device) and whether it was trained with the generator.
    Its weights lie beside the generator's (:data:`amrg.models.features.VISION_WEIGHTS`), so inference
    rebuilds it without the pre-training outputs."""

    source: str
    name: str
    kwargs: dict
    image_size: int
    trainable: bool = False


@dataclass(frozen=True)
class GeneratorSpec:
    """Everything needed to rebuild a trained generator besides its weights and banks (written to
    ``generator/config.json``): the LLM section, the Hopfield memories and their index, the prompt,
    the visual pooling, the input widths, the LLM's weight dtype, the prompt template, the image-part
    LayerNorm, how the views' visual tokens are combined, whether Q is in the prefix and the generator-side
    vision encoder (a spec saved before a field existed loads with its default)."""

    llm: Llm
    hopfield: Hopfield
    index: BankIndex
    prompt: str
    visual_pool: int
    visual_dim: int
    query_dim: int
    dtype: str = "fp32"  # the LLM's weight dtype: fp32 | bf16 (llm_dtype)
    prompt_template: str = DEFAULT_TEMPLATE  # generator.prompt_template (split_template)
    embed_norm: bool = False  # generator.embed_norm
    views: str = "concat"  # generator.views: concat | mean (amrg.models.features.visual_tokens)
    query_tokens: bool = True  # generator.query_tokens: Q in the prefix (false: [F, F'] only)
    vision: VisionSpec | None = None  # the generator-side encoder of F (None: the stage-1 classifier's)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GeneratorSpec":
        from ..config import BankIndex, Hopfield, Llm

        vision = VisionSpec(**d["vision"]) if d.get("vision") else None
        return cls(**{**d, "llm": Llm(**d["llm"]), "hopfield": Hopfield(**d["hopfield"]),
                      "index": BankIndex(**d["index"]), "vision": vision})


def create_generator(spec: GeneratorSpec, visual_bank: torch.Tensor | None, report_bank: torch.Tensor | None, *,
                     train_texts: list[str] | None = None, saved: Path | None = None) -> "ReportGenerator":
    """The one generator factory. For training pass ``train_texts`` (a scratch LM's tokenizer is trained
    on them); to rebuild a trained run pass ``saved`` (its generator directory) and load the weights
    with :meth:`ReportGenerator.load_trainable`. The banks are the switched-on memories (None: off)."""
    from .llm import create_llm

    llm, tokenizer = create_llm(spec.llm, DTYPES[spec.dtype], train_texts=train_texts, saved=saved,
                                prompt=" ".join(split_template(spec.prompt_template, spec.prompt)))
    return ReportGenerator(llm, tokenizer, spec.visual_dim, spec.query_dim, visual_bank, report_bank, spec.hopfield,
                           spec.prompt, dataclasses.asdict(spec.index), template=spec.prompt_template,
                           embed_norm=spec.embed_norm, query_tokens=spec.query_tokens)


def split_template(template: str, prompt: str) -> tuple[str, str]:
    """The prompt template's text before and after its ``{image}`` (where F, Q, F' go), ``{prompt}``
    replaced by ``prompt`` wherever it is. Whitespace next to ``{image}`` only separates text from the
    image and is dropped: ``"{image} {prompt}"`` gives ``("", prompt)``."""
    if template.count(TEMPLATE_IMAGE) != 1 or template.count(TEMPLATE_PROMPT) != 1:
        raise ValueError(f"the prompt template must contain {TEMPLATE_IMAGE} and {TEMPLATE_PROMPT} exactly once "
                         f"(got {template!r})")
    before, after = template.split(TEMPLATE_IMAGE)
    return before.rstrip().replace(TEMPLATE_PROMPT, prompt), after.lstrip().replace(TEMPLATE_PROMPT, prompt)


def enhanced_tokens(v_hopfield: nn.Module | None, r_hopfield: nn.Module | None,
                    disease_features: torch.Tensor) -> torch.Tensor | None:
    """eq. 8-9: per disease k the rows [f*_v,k, f*_r,k] of the V- and R-Hopfield retrievals of the
    disease feature F_d[k], ``(B, 14 * n_on, hidden)`` (None when both memories are off)."""
    enhanced = [h(disease_features) for h in (v_hopfield, r_hopfield) if h is not None]
    return torch.stack(enhanced, dim=2).flatten(1, 2) if enhanced else None


class ReportGenerator(nn.Module):
    def __init__(self, llm, tokenizer, visual_dim: int, query_dim: int, visual_bank: torch.Tensor | None,
                 report_bank: torch.Tensor | None, hopfield, prompt: str, index: dict | None = None, *,
                 template: str = DEFAULT_TEMPLATE, embed_norm: bool = False, query_tokens: bool = True):
        super().__init__()
        self.llm, self.tokenizer = llm, tokenizer
        hidden = llm.config.hidden_size
        self.proj_visual = nn.Sequential(nn.LayerNorm(visual_dim), nn.Linear(visual_dim, hidden))
        # Q (generator.query_tokens); off, no projection is built: nothing untrained in the weights, none unused
        # under DDP (F_d still feeds the Hopfield memories)
        self.proj_query = nn.Sequential(nn.LayerNorm(query_dim), nn.Linear(query_dim, hidden)) if query_tokens \
            else None
        kw = dict(cfg=hopfield, query_dim=query_dim, out_dim=hidden, index=index)
        self.v_hopfield = HopfieldRetrieval.from_config(memory=visual_bank, **kw) if visual_bank is not None else None
        self.r_hopfield = HopfieldRetrieval.from_config(memory=report_bank, **kw) if report_bank is not None else None
        self.embed_norm = nn.LayerNorm(hidden) if embed_norm else None  # the released code's layer_norm
        # BOS first (a tokenizer without one, e.g. Qwen's, gives none), then the template's text around the image
        bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
        before, after = (tokenizer(t, add_special_tokens=False)["input_ids"] if t else []
                         for t in split_template(template, prompt))
        self.register_buffer("before_ids", torch.tensor(bos + before, dtype=torch.long), persistent=False)
        self.register_buffer("after_ids", torch.tensor(after, dtype=torch.long), persistent=False)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.llm.get_input_embeddings()(ids)

    def visual_embeds(self, visual_tokens: torch.Tensor) -> torch.Tensor:
        """E_v: the visual tokens F as the LLM sees them, ``(B, N_F, hidden)`` (N_F = N_VIEWS * T, or T for
        ``views = mean``): the visual mapper. The encoder whose tokens it maps is chosen at the seam
        :func:`amrg.models.features.visual_tokens`. The bidirectional objectives
        (:mod:`amrg.models.bidirectional`) regularise exactly this tensor."""
        return self.proj_visual(visual_tokens)

    def image_embeds(self, visual_tokens: torch.Tensor, disease_features: torch.Tensor,
                     visual: torch.Tensor | None = None) -> torch.Tensor:
        """The image part [F, Q, F'] of eq. 10, ``(B, N_F + 14 + 14 * n_on, hidden)`` float32, under one
        LayerNorm when ``embed_norm``; without query tokens [F, F'] (``(B, N_F + 14 * n_on, hidden)``; with both
        memories off [F], the R2GenGPT / MambaXray-VL image part); ``visual``: see :meth:`prefix`."""
        parts = [self.visual_embeds(visual_tokens) if visual is None else visual]
        if self.proj_query is not None:
            parts.append(self.proj_query(disease_features))
        if (enhanced := enhanced_tokens(self.v_hopfield, self.r_hopfield, disease_features)) is not None:
            parts.append(enhanced)
        image = torch.cat([p.float() for p in parts], dim=1)
        return image if self.embed_norm is None else self.embed_norm(image)

    def prefix(self, visual_tokens: torch.Tensor, disease_features: torch.Tensor,
               visual: torch.Tensor | None = None) -> torch.Tensor:
        """[BOS, text before, F, Q, F', text after] as embeddings ``(B, P, hidden)`` in the LLM's dtype
        (eq. 10 inside the prompt template); ``visual``: E_v already computed by :meth:`visual_embeds`
        (training with the bidirectional objectives shares it)."""
        image = self.image_embeds(visual_tokens, disease_features, visual)
        before, after = (self.embed(ids).unsqueeze(0).expand(image.shape[0], -1, -1)
                         for ids in (self.before_ids, self.after_ids))
        return torch.cat([before, image.to(before.dtype), after], dim=1)

    def forward(self, visual_tokens, disease_features, report_ids, report_mask, visual=None,
                input_ids=None) -> torch.Tensor:
        """eq. 12: mean next-token loss over the report tokens only (``report_ids`` end with EOS, no
        BOS); prefix and prompt positions carry no loss. ``visual``: see :meth:`prefix`. ``input_ids``: the
        report tokens the LLM reads when they differ from the targets (:func:`amrg.tasks.word_dropout`)."""
        prefix = self.prefix(visual_tokens, disease_features, visual)
        embeds = torch.cat([prefix, self.embed(report_ids if input_ids is None else input_ids)], dim=1)
        ones = torch.ones(prefix.shape[:2], dtype=report_mask.dtype, device=report_mask.device)
        mask = torch.cat([ones, report_mask], dim=1)
        ignore = torch.full(prefix.shape[:2], -100, dtype=report_ids.dtype, device=report_ids.device)
        # position p predicts token p+1: the last prefix position (the template's last text token, or the
        # last image token when no text follows the image) predicts the first report token
        labels = torch.cat([ignore, report_ids.masked_fill(report_mask == 0, -100)], dim=1)
        return self.llm(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss

    @torch.no_grad()
    def generate(self, visual_tokens, disease_features, decode) -> list[str]:
        prefix = self.prefix(visual_tokens, disease_features)
        mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
        special = {"eos_token_id": self.tokenizer.eos_token_id, "pad_token_id": self.tokenizer.pad_token_id}
        if decode.backend == "native":  # the same tokens from a static-cache loop (issue 19)
            from .decoding import generate as native_generate

            out = native_generate(self.llm, prefix, mask, decode, **special)
        else:
            # length_penalty scores finished beams; HF ignores it (with a warning) in greedy decoding
            beams = {"length_penalty": decode.length_penalty} if decode.num_beams > 1 else {}
            out = self.llm.generate(inputs_embeds=prefix, attention_mask=mask, num_beams=decode.num_beams,
                                    max_new_tokens=decode.max_new_tokens, min_new_tokens=decode.min_new_tokens,
                                    repetition_penalty=decode.repetition_penalty,
                                    no_repeat_ngram_size=decode.no_repeat_ngram_size, do_sample=False, **special,
                                    **beams)
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only trainable weights: a frozen 7B LLM is never written into the stage output."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in names}

    def load_trainable(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.trainable_state_dict())
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise ValueError(f"generator weights do not match the model: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}")
        self.load_state_dict(state, strict=False)
