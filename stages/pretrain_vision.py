"""Stage pretrain_vision: seed 002's stage #1 (CXPMRG-Bench, issue 17), autoregressive pre-training (ARM) of a
Vision-Mamba encoder in its pretrain form (:data:`amrg.models.vim.VARIANTS` ``pretrain``) with
:class:`amrg.models.arm.ARMPretrainer`.

``objective: none`` computes nothing: the stage directory holds only ``config.json`` ``{"objective": "none"}``.

``objective: arm`` trains on the train-split images of preprocess plus every image file under
``pretrain_vision.extra_images`` (recursive; ``README.md`` and files that do not decode as images are
skipped, counted), decoded once with :mod:`amrg.data.images` at the preprocessed size and streamed to a row
file under the checkpoints root (memory does not grow with the folder). Any training image whose
pixels equal a validation or test image (SHA-1 of the pixels) is dropped and counted. The validation
images give the validation loss (the whole image resized, no augmentation). On the device, each batch is
resized to ``image_size`` through one batched RandomResizedCrop (area scale ``(rrc_scale_min, 1)``, aspect
ratio ``(3/4, 4/3)``, bicubic, the side fractions clipped to the image where torchvision would resample)
and a horizontal flip, then ImageNet-normalised on 3 channels (the release's ``main_pretrain.py``
transforms). ``runtime.num_processes > 1`` relaunches the stage under torchrun (:mod:`amrg.dist`): each rank
takes its share of every global batch (the gradient is the mean over the global batch; each rank draws its own
crops, as data-parallel MAE / ARM training does) and rank 0 writes the outputs. :func:`amrg.train.fit` runs AdamW ``(0.9, beta2)`` at ``lr = blr * batch / 256`` with
``warmup_epochs`` of linear warm-up then cosine, gradient clipping ``clip_grad``, resumable checkpoints.

Outputs (``artifacts/pretrain/vision``): ``backbone.safetensors`` (the encoder's state dict),
``encoder.json`` (timm ``name``, the full VisionMamba ``kwargs`` of the pretrain form, ``image_size``,
``"form": "pretrain"``), ``metrics.json``, ``dvclive/`` and ``params.json``.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F

from amrg import dist
from amrg.data.images import ImageError, decode_image
from amrg.data.store import TensorRows, load_images, write_rows
from amrg.io import autocast, save_tensors, setup_runtime, write_json
from amrg.models.arm import ARMPretrainer
from amrg.models.vim import VARIANTS
from amrg.models.vision import load_backbone_weights
from amrg.train import LoopConfig, Selection, fit

from .common import Timer, clear_stage_dir, fingerprint, log_history, start, write_resolved

STAGE = "pretrain_vision"
ASPECT = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's default ratio range
IGNORED_FILES = ("README.md",)
HASH_BATCH = 256  # images read per pixel-store access while hashing


def encoder_kwargs(kwargs: dict) -> dict:
    """The full VisionMamba overrides of the pretrain form (the variant's, then ``kwargs``), without the size."""
    base = {k: v for k, v in VARIANTS["pretrain"].items() if k != "img_size"}
    return {**base, **{k: v for k, v in kwargs.items() if k != "img_size"}}


def pixel_hash(image: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


def row_hashes(pixels, rows: np.ndarray) -> list[str]:
    """:func:`pixel_hash` of each image row of the pixel store, read in batches of :data:`HASH_BATCH`."""
    return [pixel_hash(im) for at in range(0, len(rows), HASH_BATCH) for im in pixels.read(rows[at:at + HASH_BATCH])]


def extra_images(folder: str, size: int, held: set[str], out: Path, log) -> tuple[TensorRows | None, np.ndarray, dict]:
    """Decode every image under ``folder`` at ``size`` once, streamed to the row file ``out`` (memory: one batch,
    whatever the folder holds); files that are not images are skipped and duplicates of held-out images
    dropped, each counted. Returns the row file (None: no file), the rows to train on and the counts."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"pretrain_vision.extra_images: {root} is not a folder (make it, or point the key "
                                "at a folder of images; it may be empty)")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name not in IGNORED_FILES)
    counts = {"extra_images": 0, "extra_duplicates_dropped": 0, "extra_not_images": 0}
    keep = np.zeros(len(files), dtype=bool)

    def batches():
        for at in range(0, len(files), HASH_BATCH):
            chunk = np.zeros((len(files[at:at + HASH_BATCH]), size, size), np.uint8)
            for j, path in enumerate(files[at:at + HASH_BATCH]):
                try:
                    img = decode_image(root, path.relative_to(root).as_posix(), size)
                except ImageError as e:
                    log.info("extra image skipped: %s", e)
                    counts["extra_not_images"] += 1
                    continue
                if pixel_hash(img) in held:
                    counts["extra_duplicates_dropped"] += 1
                    continue
                chunk[j], keep[at + j] = img, True
            yield (chunk,)

    if not files:
        return None, np.zeros(0, np.int64), counts
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = write_rows([out], len(files), batches())[0]
    counts["extra_images"] = int(keep.sum())
    return rows, np.flatnonzero(keep), counts


def crop_boxes(n: int, scale_min: float, flip: bool) -> torch.Tensor:
    """``(n, 2, 3)`` affine maps of output to input coordinates (normalised [-1, 1]): a random crop of area
    share ``U(scale_min, 1)`` and aspect ``exp U(log 3/4, log 4/3)`` (side shares clipped to 1), placed
    uniformly inside the image, mirrored left-right with probability 1/2 when ``flip``. Drawn from torch's
    global RNG on the CPU (restored by a resumed checkpoint)."""
    area = torch.empty(n).uniform_(scale_min, 1.0)
    ratio = torch.empty(n).uniform_(math.log(ASPECT[0]), math.log(ASPECT[1])).exp()
    w, h = (area * ratio).sqrt().clamp(max=1.0), (area / ratio).sqrt().clamp(max=1.0)
    cx, cy = (torch.rand(n) * 2 - 1) * (1 - w), (torch.rand(n) * 2 - 1) * (1 - h)
    sign = torch.where(torch.rand(n) < 0.5, -1.0, 1.0) if flip else torch.ones(n)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * sign, cx, h, cy
    return theta


class PretrainImages:
    """uint8 training images (the kept train rows of the pixel store, then the kept rows of the extra images'
    row file) -> model input; both read by rows, nothing held in memory."""

    def __init__(self, pixels, rows: np.ndarray, extras, extra_rows: np.ndarray, size: int, mean, std, device):
        self.pixels, self.rows, self.size, self.device = pixels, rows, size, device
        self.extras, self.extra_rows = extras, extra_rows
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return len(self.rows) + len(self.extra_rows)

    def read(self, idx: torch.Tensor) -> torch.Tensor:
        idx = idx.numpy()
        store = idx < len(self.rows)
        out = torch.empty(len(idx), *self.pixels.shape[1:], dtype=torch.uint8)
        if store.any():
            out[torch.from_numpy(store)] = self.pixels[self.rows[idx[store]]]
        if (~store).any():
            out[torch.from_numpy(~store)] = self.extras[self.extra_rows[idx[~store] - len(self.rows)]]
        return out

    def to_input(self, images: torch.Tensor, theta: torch.Tensor | None) -> torch.Tensor:
        """uint8 ``(B, S, S)`` -> normalised ``(B, 3, size, size)``: the crops of ``theta`` (None: the whole image)."""
        x = images.to(self.device, non_blocking=True).float().unsqueeze(1) / 255.0
        if theta is None:
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False)
        else:
            grid = F.affine_grid(theta.to(self.device), [len(x), 1, self.size, self.size], align_corners=False)
            x = F.grid_sample(x, grid, mode="bicubic", padding_mode="border", align_corners=False)
        x = x.clamp(0.0, 1.0).expand(-1, self.mean.shape[1], -1, -1)
        return (x - self.mean) / self.std


def main(argv: list[str] | None = None) -> None:
    params, log, layout = start(STAGE, argv)
    pv, out = params.pretrain_vision, layout.stage_dir(STAGE)
    if pv.objective == "none":
        clear_stage_dir(out)
        write_json(out / "config.json", {"objective": "none"})
        log.info("pretrain_vision.objective none: nothing to pre-train")
        return
    dist.relaunch(params.runtime.num_processes, f"stages.{STAGE}", argv)  # N > 1: under torchrun, then exits
    timer, device = Timer(), setup_runtime(params.runtime)  # joins the process group under torchrun
    ctx = dist.context()
    if ctx.is_main:
        clear_stage_dir(out)
    images = load_images(layout.images, layout.pixels)
    pixels, size = images.pixels, int(images.pixels.shape[-1])
    held = set(row_hashes(pixels, np.flatnonzero(np.isin(images.split, ["val", "test"]))))
    train = np.flatnonzero(images.split == "train")
    keep = np.array([h not in held for h in row_hashes(pixels, train)], dtype=bool)
    train, dropped = train[keep], int((~keep).sum())  # train images equal to a held-out one are dropped
    extra_file = layout.checkpoints / STAGE / f"extra_pixels.rank{ctx.rank}.npy"  # each rank decodes its own copy
    extras, extra_rows, counts = extra_images(pv.extra_images, size, held, extra_file, log)
    val = np.flatnonzero(images.split == "val")

    kwargs = encoder_kwargs(pv.kwargs)
    encoder = timm.create_model(pv.name, num_classes=0, img_size=pv.image_size, **kwargs)
    if pv.init_checkpoint:
        load_backbone_weights(encoder, pv.init_checkpoint)
    model = ARMPretrainer(encoder, pv.cluster, pv.feature_layers, pv.decoder_dim, pv.decoder_depth,
                          pv.decoder_heads, pv.target, pv.norm_pix_loss).to(device)
    cfg = encoder.pretrained_cfg
    data = PretrainImages(pixels, train, extras, extra_rows, pv.image_size, cfg["mean"], cfg["std"], device)
    if len(data) == 0:
        raise ValueError("pretrain_vision: no training image (no train split image and no extra image)")
    precision = params.runtime.precision

    def batch_loss(module, idx: torch.Tensor) -> torch.Tensor:
        x = data.to_input(data.read(idx), crop_boxes(len(idx), pv.rrc_scale_min, pv.hflip))
        with autocast(device, precision):
            return module(x)

    @torch.no_grad()
    def validate() -> dict[str, float]:
        if not len(val):
            return {}
        model.eval()
        total = 0.0
        for at in range(0, len(val), pv.batch_size):
            rows = val[at:at + pv.batch_size]
            with autocast(device, precision):
                total += float(model(data.to_input(pixels[rows], None))) * len(rows)
        model.train()
        return {"val_loss": total / len(val)}

    steps_per_epoch = math.ceil(len(data) / pv.batch_size)
    loop = LoopConfig(pv.epochs, pv.batch_size, pv.blr * pv.batch_size / 256, pv.weight_decay,
                      pv.warmup_epochs * steps_per_epoch, 1, pv.checkpoint_every, params.runtime.seed,
                      max_grad_norm=pv.clip_grad, betas=(0.9, pv.beta2), no_decay_1d=True)
    fp = fingerprint(pv, params.runtime, layout.images, layout.pixels, Path(pv.extra_images))
    fitted = fit(model, len(data), batch_loss, validate, loop, layout.checkpoint(STAGE), fp,
                 Selection.of("val_loss" if len(val) else "train_loss"))
    model.load_state_dict(fitted.best_state, strict=False)
    seconds = timer()
    extra_file.unlink(missing_ok=True)
    dist.barrier()
    if not ctx.is_main:  # rank 0 writes the outputs
        dist.shutdown()
        return

    save_tensors(out / "backbone.safetensors", {k: v.contiguous() for k, v in encoder.state_dict().items()})
    write_json(out / "encoder.json", {"name": pv.name, "kwargs": kwargs, "image_size": pv.image_size,
                                      "form": "pretrain"})
    steps = steps_per_epoch * len(fitted.history)
    write_json(out / "metrics.json", {
        "phantom_images": layout.is_phantom(), "objective": pv.objective, "target": pv.target,
        "train_loss": fitted.best["train_loss"], "val_loss": fitted.best.get("val_loss"),
        "epochs": len(fitted.history), "best_epoch": fitted.best["epoch"], "images": len(data),
        "train_split_images": len(train), "duplicates_dropped": dropped + counts["extra_duplicates_dropped"],
        "train_split_duplicates_dropped": dropped, **counts, "val_images": len(val),
        "steps_per_s": round(steps / max(seconds, 1e-9), 3), "seconds": seconds, "processes": ctx.world})
    log_history(out, fitted.history)
    write_resolved(out, pretrain_vision=pv, runtime=params.runtime)
    log.info("ARM pre-training: %d images (%d extra, %d duplicates dropped), kept epoch %d, val loss %s, %.0fs",
             len(data), counts["extra_images"], dropped + counts["extra_duplicates_dropped"], fitted.best["epoch"],
             fitted.best.get("val_loss"), seconds)
    dist.shutdown()


if __name__ == "__main__":
    main()
