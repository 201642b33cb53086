"""What :func:`amrg.train.fit` trains: the loss of a batch and the validation metrics, per model.

- :class:`ClassifierTask`: stage 1 (paper III-B), eq. 11 on every image of the training studies,
  validated by BCE and mean AUROC on the validation images.
- :class:`GeneratorTask`: stage 2 (paper III-C/D), eq. 12 on precomputed stage-1 features, validated
  by the token-mean loss and by BLEU-4, CIDEr, CE F1 and the distinct ratio of the validation reports
  (greedy, or decoded with the ``decode`` section); optionally with seed 004's
  bidirectional objectives (``vtc_weight * VTC + tvc_weight * TVC + rec_weight * REC``,
  :mod:`amrg.models.bidirectional`), whose training-only heads the task owns; with a trainable
  generator-side encoder (``generator_vision.trainable``) F is computed in the step from the studies' view
  pixels (:class:`WithVision`), read ahead of it by :meth:`GeneratorTask.loader`.
"""

from __future__ import annotations

import numpy as np
import torch

from . import dist
from .config import Decode, Labels
from .io import autocast, progress
from .labels import label
from .metrics import ce_scores, nlg_scores
from .metrics.nlg import distinct_ratio
from .metrics.classification import multilabel_metrics
from .models.classifier import classifier_loss, predict_proba


class ImageBatches(torch.utils.data.Dataset):
    """Training images for a ``DataLoader`` with a batch sampler: ``__getitems__(batch)`` reads the batch's
    rows of the pixel store in one read and returns ``(uint8 pixels (B, S, S), targets (B, 14))``."""

    def __init__(self, pixels, targets: torch.Tensor, rows: np.ndarray):
        self.pixels, self.targets, self.rows = pixels, targets, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, batch: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.rows[np.asarray(batch, dtype=np.int64)]
        return self.pixels[rows], self.targets[rows]

    def __getitem__(self, i: int):
        return self.__getitems__([i])


def as_batch(batch):
    """The DataLoader's collate function: the dataset already returns whole batches."""
    return batch


class StudyViews(torch.utils.data.Dataset):
    """The view images of studies for a ``DataLoader`` with a batch sampler: ``__getitems__(batch)`` reads the
    batch's ``view_rows (S, V)`` rows of the pixel store in one read and returns ``(study indices (B,),
    uint8 pixels (B, V, H, W))``."""

    def __init__(self, pixels, view_rows: np.ndarray):
        self.pixels, self.view_rows = pixels, np.asarray(view_rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.view_rows)

    def __getitems__(self, batch: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        b = torch.as_tensor(batch, dtype=torch.long)
        rows = self.view_rows[b.numpy()]
        return b, self.pixels[rows.reshape(-1)].reshape(*rows.shape, *self.pixels.shape[1:])

    def __getitem__(self, i: int):
        return self.__getitems__([i])


class WithVision(torch.nn.Module):
    """What :func:`amrg.train.fit` trains with a trainable generator-side encoder (MambaXray-VL's SFT, the
    released AM-MRG code): the :class:`~amrg.models.features.VisionTower` (parameters under :attr:`PREFIX`,
    their own lr through ``LoopConfig.lr_by_prefix``) and the generator, or its
    :class:`~amrg.models.bidirectional.Bidirectional` wrapper (under ``net.``). ``forward(pixels, F_d, ...)``
    is the wrapped module's with F = the tower's tokens of the uint8 view ``pixels (B, V, H, W)``: one module,
    so DistributedDataParallel averages the encoder's gradients with the rest."""

    PREFIX = "vision."

    def __init__(self, vision: torch.nn.Module, net: torch.nn.Module):
        super().__init__()
        self.vision, self.net = vision, net

    def forward(self, pixels: torch.Tensor, *args, **kwargs):
        return self.net(self.vision(pixels), *args, **kwargs)

    @classmethod
    def split_state(cls, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """fit's weights -> (the wrapped module's, under its own names; the tower's, under its own names)."""
        net = {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}
        vision = {k.removeprefix(cls.PREFIX): v for k, v in state.items() if k.startswith(cls.PREFIX)}
        if len(net) + len(vision) != len(state):
            raise ValueError(f"weights outside net. and {cls.PREFIX}: "
                             f"{sorted(k for k in state if not k.startswith(('net.', cls.PREFIX)))[:5]}")
        return net, vision


class ClassifierTask:
    """uint8 ``pixels (N, S, S)`` (a tensor or :class:`amrg.data.store.TensorRows`), binary ``targets (N, 14)``;
    ``train``/``val`` are image rows. :meth:`loader` reads training batches ahead of the step
    (``loader_workers`` processes, pinned memory on CUDA); pixels are normalised on the device.
    ``ortho_on`` (``classifier.ortho_on``): eq. 11's orthogonality term on the disease ``queries`` or on
    each image's disease ``features``. :meth:`validate` also reports the mean BCE and orthogonality terms
    of the training batches since its last call (this rank's, since the resume point of a resumed epoch)."""

    def __init__(self, model, pixels, targets: torch.Tensor, train: np.ndarray, val: np.ndarray,
                 ortho_weight: float, pos_weight: torch.Tensor | None, batch_size: int, device: torch.device,
                 precision: str, loader_workers: int = 0, ortho_on: str = "queries"):
        if ortho_on not in ("queries", "features"):
            raise ValueError(f"ortho_on must be queries or features, not {ortho_on!r}")
        self.model, self.pixels, self.targets, self.train, self.val = model, pixels, targets, train, val
        self.ortho_weight, self.pos_weight, self.batch_size = ortho_weight, pos_weight, batch_size
        self.device, self.precision, self.loader_workers = device, precision, loader_workers
        self.ortho_on = ortho_on
        self.terms = np.zeros(3)  # Σ bce·n, Σ ortho·n, Σ n over the training batches since validate()

    def loader(self, shards: list[torch.Tensor]) -> torch.utils.data.DataLoader:
        workers = self.loader_workers
        return torch.utils.data.DataLoader(
            ImageBatches(self.pixels, self.targets, self.train), batch_sampler=[s.tolist() for s in shards],
            collate_fn=as_batch, num_workers=workers, pin_memory=self.device.type == "cuda",
            prefetch_factor=2 if workers else None,
            generator=torch.Generator().manual_seed(0))  # its worker seed must not draw from the global RNG,
        # which a resumed run restores from the checkpoint (the loader holds no randomness of its own)

    def batch_loss(self, net: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        pixels, targets = batch
        with autocast(self.device, self.precision):
            logits, features = net(pixels.to(self.device, non_blocking=True), with_features=True)
        rows = features.float() if self.ortho_on == "features" else self.model.qformer.queries
        loss, parts = classifier_loss(logits.float(), targets.to(self.device, non_blocking=True), rows,
                                      self.ortho_weight, self.pos_weight)
        self.terms += np.array([parts["bce"], parts["ortho"], 1.0]) * len(targets)
        return loss

    def probabilities(self, rows: np.ndarray) -> np.ndarray:
        return predict_proba(self.model, self.pixels, rows, self.device, self.precision, self.batch_size)

    def validate(self) -> dict[str, float]:
        probs, t = self.probabilities(self.val), self.targets[self.val]
        bce = torch.nn.functional.binary_cross_entropy(torch.from_numpy(probs).clamp(1e-6, 1 - 1e-6), t)
        m = multilabel_metrics(t.numpy(), probs)
        per_label = {f"val_auroc_label/{k}": v["auroc"] for k, v in m["per_label"].items() if v["auroc"] is not None}
        bce_sum, ortho_sum, n = self.terms
        self.terms = np.zeros(3)
        train = {"train_bce": float(bce_sum / n), "train_ortho": float(ortho_sum / n)} if n else {}
        return {"val_loss": float(bce), "val_auroc": m["mean_auroc"] or 0.0, **train, **per_label}


TOKENIZE_BLOCK = 4096  # reports tokenized at a time: Python token lists exist for one block only


def tokenize_reports(tokenizer, reports: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Report token ids + EOS, right-padded: ``(N, L)`` ids and attention mask (``L``: the longest)."""
    blocks, width = [], 1
    for s in range(0, len(reports), TOKENIZE_BLOCK):
        ids = tokenizer(reports[s:s + TOKENIZE_BLOCK], add_special_tokens=False, truncation=True,
                        max_length=max_tokens - 1)["input_ids"]
        lengths = torch.tensor([len(x) + 1 for x in ids])
        block = torch.full((len(ids), int(lengths.max())), tokenizer.pad_token_id, dtype=torch.long)
        for i, x in enumerate(ids):
            block[i, : len(x) + 1] = torch.tensor(x + [tokenizer.eos_token_id])
        blocks.append((block, lengths))
        width = max(width, block.shape[1])
    out = torch.full((len(reports), width), tokenizer.pad_token_id, dtype=torch.long)
    row = 0
    for block, _ in blocks:
        out[row:row + len(block), : block.shape[1]] = block
        row += len(block)
    lengths = torch.cat([n for _, n in blocks]) if blocks else torch.zeros(0, dtype=torch.long)
    mask = (torch.arange(width) < lengths[:, None]).long()
    return out, mask


BLEU4_CIDER_WEIGHTS = {"BLEU_4": 0.5, "CIDEr": 0.5}
"""R2GenGPT's validation score: ``--scorer_types ['Bleu_4', 'CIDEr']`` with ``--weights [0.5, 0.5]``
(wang-zhanyu/R2GenGPT:configs/config.py, summed in models/R2GenGPT.py::on_validation_epoch_end). The
released AM-MRG code keeps the weights but scores ``['Bleu_4']`` only
(Event-AHU/Medical_Image_Analysis:AM_MRG/configs/config.py): its selection is BLEU-4's."""


def bleu4_cider(nlg: dict[str, float]) -> float:
    """``val_bleu4_cider`` = 0.5 BLEU-4 + 0.5 CIDEr of :func:`amrg.metrics.nlg_scores`' output (R2GenGPT)."""
    return sum(w * nlg[k] for k, w in BLEU4_CIDER_WEIGHTS.items())


def word_dropout(ids: torch.Tensor, mask: torch.Tensor, rate: float, unk_id: int) -> torch.Tensor | None:
    """Word dropout (Bowman et al. 2016, "Generating sentences from a continuous space", sec. 3.3): each
    real report token the LLM *reads* under teacher forcing is replaced by ``unk_id`` with probability
    ``rate`` (global torch RNG, which :func:`amrg.train.fit` seeds and checkpoints); the targets are
    unchanged. A decoder that cannot trust its own history must read the image prefix to predict the next
    token, which is what keeps it from writing the same report for every study. None at ``rate = 0``."""
    if rate <= 0:
        return None
    drop = (torch.rand(ids.shape) < rate) & (mask > 0)
    return ids.masked_fill(drop, unk_id)


class GeneratorTask:
    """``features[split] = (F, F_d)`` of the split's studies, ``reports[split]`` their reference texts.

    :meth:`validate` decodes every val study (``select_decode``: ``greedy`` up to ``max_tokens``, or
    ``configured``: with ``decode``, the evaluate stage's beams, lengths and penalties) and returns
    ``val_loss``, ``val_bleu4``, ``val_cider``, ``val_bleu4_cider`` (:func:`bleu4_cider`), ``val_ce_f1`` (the
    headline CE F1 of :func:`amrg.metrics.ce_scores`, reports and references labelled by ``labels.labeler``,
    under ``ce_uncertain_as`` / ``ce_labels``, as evaluate scores the test split) and ``val_distinct`` (the
    template guard's share of distinct reports); ``generator.select`` names the one that keeps an epoch.

    The bidirectional objectives (seed 004): ``aux`` is the training-only heads module
    (:class:`amrg.models.bidirectional.AuxiliaryObjectives`, None when TVC and REC are off: then
    :attr:`trainee` is ``model`` itself and everything runs as without them), ``rec_targets[split]``
    the REC targets ``(S, V, H, W)`` of the split's studies. The loss is
    ``vtc_weight * VTC + tvc_weight * TVC + rec_weight * REC``; ``val_loss`` stays the VTC report loss
    (token mean), so the kept-epoch selection (``generator.select``) means what it meant. Unless the
    objective is plain VTC, :meth:`validate` also returns every term: ``train_<term>`` (the mean over the
    batches this process ran since the previous validation: the epoch, or its rest after a resume) and
    ``val_<term>``; VTC is token-weighted, TVC and REC are per-study means.

    A trainable generator-side encoder (``vision``, a :class:`~amrg.models.features.VisionTower`): F is not
    cached (``features[split] = (None, F_d)``); ``view_pixels[split] = (pixels, view_rows (S, V))`` give each
    study's view images, read per training batch ahead of the step by :meth:`loader` (fit's ``loader``) and per
    validation batch in :meth:`validate`, and :attr:`trainee` is :class:`WithVision`. Without it (the default,
    and a frozen encoder whose F is cached like the classifier's) everything runs as before.
    """

    def __init__(self, model, features: dict[str, tuple[torch.Tensor, torch.Tensor]], reports: dict[str, list[str]],
                 max_tokens: int, batch_size: int, device: torch.device, precision: str, *, vtc_weight: float = 1.0,
                 tvc_weight: float = 0.0, rec_weight: float = 0.0, aux=None,
                 rec_targets: dict[str, torch.Tensor] | None = None, labels: Labels = Labels(),
                 ce_uncertain_as: str = "negative", ce_labels: str = "all14", decode: Decode | None = None,
                 select_decode: str = "greedy", word_dropout: float = 0.0, vision: torch.nn.Module | None = None,
                 view_pixels: dict[str, tuple] | None = None, loader_workers: int = 0):
        self.model, self.features, self.reports = model, features, reports
        self.word_dropout = word_dropout
        tok = model.tokenizer
        self.unk_id = tok.unk_token_id if tok.unk_token_id is not None else tok.pad_token_id
        self.ids = {split: tokenize_reports(model.tokenizer, texts, max_tokens) for split, texts in reports.items()}
        self.greedy = Decode(num_beams=1, max_new_tokens=max_tokens, min_new_tokens=1)
        self.batch_size, self.device, self.precision = batch_size, device, precision
        if select_decode not in ("greedy", "configured") or (select_decode == "configured" and decode is None):
            raise ValueError(f"select_decode must be 'greedy' or 'configured' (with a decode section); got "
                             f"{select_decode!r}, decode {decode!r}")
        self.val_decode = self.greedy if select_decode == "greedy" else decode  # the validation reports' decoding
        # CE as evaluate scores it: the configured labeler on both sides, ce_scores under evaluate's convention
        self.labels, self.ce_uncertain_as, self.ce_labels = labels, ce_uncertain_as, ce_labels
        self.ref_labels = self.labeler(reports["val"])  # the reference val reports' labels, once
        self.weights = {"vtc": vtc_weight, "tvc": tvc_weight, "rec": rec_weight}
        on = {k for k in ("tvc", "rec") if self.weights[k] > 0}
        built = set() if aux is None else {k for k in ("tvc", "rec") if getattr(aux, k) is not None}
        if on != built:
            raise ValueError(f"the auxiliary heads {sorted(built)} do not match the terms with a weight > 0 "
                             f"{sorted(on)}")
        if "rec" in on and not rec_targets:
            raise ValueError("rec_weight > 0 needs the REC targets (rec_targets)")
        self.aux = aux
        self.trainee = model if aux is None else aux.wrap(model)  # what fit trains
        self.vision, self.view_pixels, self.loader_workers = vision, view_pixels, loader_workers
        if vision is not None:
            if not view_pixels or any(k not in view_pixels for k in reports):
                raise ValueError(f"a trainable vision encoder needs the view pixels of every split {sorted(reports)} "
                                 "(view_pixels)")
            self.trainee = WithVision(vision, self.trainee)
        self.text = {split: aux.tokenize(texts) for split, texts in reports.items()} if "tvc" in on else None
        self.rec_targets = rec_targets if "rec" in on else None
        self.terms = ["vtc", *sorted(on)] if self.weights != {"vtc": 1.0, "tvc": 0.0, "rec": 0.0} else []
        self._train_sums = torch.zeros(2 * 3, dtype=torch.float64)  # per term: sum of value x weight, sum of weights
        self._last: dict[str, float] = {}

    def labeler(self, texts: list[str]) -> np.ndarray:
        """CheXpert-14 labels of ``texts`` with the configured labeler (``labels.labeler``), called as the
        evaluate stage calls it."""
        return label(texts, self.labels.labeler, device=str(self.device), **self.labels.options())

    def split_state(self, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """fit's kept weights -> (the generator's, as ``weights.safetensors`` holds them; the auxiliary heads');
        a trainable encoder's are :meth:`vision_state`'s."""
        if self.vision is not None:
            state = WithVision.split_state(state)[0]
        if self.aux is None:
            return state, {}
        from .models.bidirectional import Bidirectional

        return Bidirectional.split_state(state)

    def vision_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """fit's kept weights -> the trainable encoder's, under the tower's names ({} without one)."""
        return {} if self.vision is None else WithVision.split_state(state)[1]

    def read_views(self, split: str, b: torch.Tensor) -> torch.Tensor:
        """uint8 view pixels ``(len(b), V, H, W)`` of studies ``b`` of ``split`` (one read of the pixel store)."""
        pixels, view_rows = self.view_pixels[split]
        return StudyViews(pixels, view_rows).__getitems__(b.tolist())[1]

    def loader(self, shards: list[torch.Tensor]) -> torch.utils.data.DataLoader:
        """fit's ``loader`` with a trainable encoder: ``(study indices, view pixels)`` of each shard, read
        ahead of the step (``loader_workers`` processes, pinned memory on CUDA)."""
        pixels, view_rows = self.view_pixels["train"]
        workers = self.loader_workers
        return torch.utils.data.DataLoader(
            StudyViews(pixels, view_rows), batch_sampler=[s.tolist() for s in shards], collate_fn=as_batch,
            num_workers=workers, pin_memory=self.device.type == "cuda", prefetch_factor=2 if workers else None,
            generator=torch.Generator().manual_seed(0))  # no draw from the global RNG (see ClassifierTask.loader)

    def visual_input(self, split: str, b: torch.Tensor, pixels: torch.Tensor | None = None) -> torch.Tensor:
        """What the trainee's first argument is for rows ``b``: the cached F, or with a trainable encoder the
        view ``pixels`` (read here unless the loader already did), on the device."""
        if self.vision is None:
            return self.features[split][0][b].to(self.device)
        return (self.read_views(split, b) if pixels is None else pixels).to(self.device, non_blocking=True)

    def loss(self, net: torch.nn.Module, split: str, b: torch.Tensor,
             pixels: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        """Mean loss over the report tokens of rows ``b`` of ``split`` and how many tokens that is (with the
        auxiliary terms: their weighted per-study means added; each term's value is kept in ``_last``);
        ``pixels``: the rows' view images when already read (:meth:`visual_input`)."""
        (_, fd), (tok, mask) = self.features[split], self.ids[split]
        f = self.visual_input(split, b, pixels)
        width = int(mask[b].sum(1).max())
        n = int(mask[b].sum())
        read = word_dropout(tok[b, :width], mask[b, :width], self.word_dropout if split == "train" else 0.0,
                            self.unk_id)
        read = {} if read is None else {"input_ids": read.to(self.device)}
        if self.aux is None:
            with autocast(self.device, self.precision):
                loss = net(f, fd[b].to(self.device), tok[b, :width].to(self.device),
                           mask[b, :width].to(self.device), **read).float()
            if self.terms:
                self._last = {"vtc": float(loss.detach())}
                loss = self.weights["vtc"] * loss
            return loss, n
        extra = {}
        if self.text is not None:
            ids, tmask = self.text[split]
            tw = int(tmask[b].sum(1).max())
            extra["text"] = (ids[b, :tw].to(self.device), tmask[b, :tw].to(self.device))
        if self.rec_targets is not None:
            extra["rec_target"] = self.rec_targets[split][b].to(self.device)
        with autocast(self.device, self.precision):
            out = net(f, fd[b].to(self.device), tok[b, :width].to(self.device),
                      mask[b, :width].to(self.device), **extra, **read)
        out = {k: v.float() for k, v in out.items()}
        self._last = {k: float(v.detach()) for k, v in out.items()}
        aux = sum(self.weights[k] * out[k] for k in out if k != "vtc")
        return self.weights["vtc"] * out["vtc"] + self.aux_scale(split, len(b), n) * aux, n

    def aux_scale(self, split: str, n_rows: int, n_tokens: int) -> float:
        """Under a launcher, :func:`amrg.train.fit` weights each rank's loss by its share of the global batch's
        report tokens, right for the token-mean VTC; the per-study TVC and REC means are rescaled here by
        (study share / token share), so N processes follow one process's gradient of the global batch
        (1 in one process; a rank's one borrowed study of a batch shorter than N processes is counted)."""
        if split != "train" or dist.context().world == 1:
            return 1.0
        rows, tokens = dist.all_reduce_sum(torch.tensor([n_rows, n_tokens], dtype=torch.float64)).tolist()
        return (n_rows / rows) * (tokens / n_tokens)

    def _weights_of(self, n_rows: int, n_tokens: int) -> dict[str, float]:
        return {"vtc": float(n_tokens), "tvc": float(n_rows), "rec": float(n_rows)}

    def _accumulate(self, sums: torch.Tensor, n_rows: int, n_tokens: int) -> None:
        w = self._weights_of(n_rows, n_tokens)
        for i, k in enumerate(("vtc", "tvc", "rec")):
            if k in self._last:
                sums[2 * i] += self._last[k] * w[k]
                sums[2 * i + 1] += w[k]

    def _means(self, sums: torch.Tensor, prefix: str) -> dict[str, float]:
        return {f"{prefix}_{k}": float(sums[2 * i] / sums[2 * i + 1]) for i, k in enumerate(("vtc", "tvc", "rec"))
                if k in self.terms and sums[2 * i + 1] > 0}

    def batch_loss(self, net: torch.nn.Module, batch) -> tuple[torch.Tensor, int]:
        """fit's ``batch_loss``: ``batch`` is the training rows, or with a trainable encoder :meth:`loader`'s
        ``(rows, view pixels)``."""
        b, pixels = batch if self.vision is not None else (batch, None)
        loss, n = self.loss(net, "train", b, pixels)
        if self.terms:
            self._accumulate(self._train_sums, len(b), n)
        return loss, n

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        self.model.eval()
        if self.aux is not None:
            self.aux.eval()
        if self.vision is not None:
            self.vision.eval()
        fd = self.features["val"][1]
        total, n_tokens, hyps = 0.0, 0, []
        val_sums = torch.zeros(2 * 3, dtype=torch.float64)
        for b in progress(torch.arange(len(fd)).split(self.batch_size), "validation decoding", unit="batch"):
            pixels = None if self.vision is None else self.read_views("val", b)
            loss, n = self.loss(self.trainee, "val", b, pixels)  # the generator itself unless a head/encoder is on
            if self.terms:
                self._accumulate(val_sums, len(b), n)
                loss = self._last["vtc"]  # val_loss is the VTC report loss, whatever the weights
            total, n_tokens = total + float(loss) * n, n_tokens + n
            with autocast(self.device, self.precision):
                f = self.visual_input("val", b, pixels)
                f = f if self.vision is None else self.vision(f)
                hyps += self.model.generate(f, fd[b].to(self.device), self.val_decode)
        nlg = nlg_scores(self.reports["val"], hyps, meteor=False)
        ce = ce_scores(self.labeler(hyps), self.ref_labels, uncertain_as=self.ce_uncertain_as, labels=self.ce_labels)
        out = {"val_loss": total / max(n_tokens, 1), "val_bleu4": nlg["BLEU_4"], "val_cider": nlg["CIDEr"],
               "val_bleu4_cider": bleu4_cider(nlg), "val_ce_f1": ce["f1"], "val_distinct": distinct_ratio(hyps)}
        if self.terms:
            train = dist.all_reduce_sum(self._train_sums)
            self._train_sums = torch.zeros_like(self._train_sums)
            out |= self._means(train, "train") | self._means(val_sums, "val")
        return out
