"""Stage train_classifier (paper III-B, eq. 11): Swin encoder -> Q-Former (14 disease queries) -> head.

Trains on every image of the training studies (each image carries its study's labels) with BCE +
orthogonality loss, selects the epoch with the best validation mean AUROC, and writes the weights
(safetensors), the architecture spec, validation metrics and the loss/AUROC history. Runs
data-parallel under torchrun when ``runtime.num_processes > 1`` (:mod:`amrg.dist`).
"""

from __future__ import annotations

import numpy as np
import torch

from amrg import dist
from amrg.data.store import load_images, load_studies
from amrg.io import autocast, save_tensors, setup_runtime, write_json
from amrg.metrics.classification import multilabel_metrics
from amrg.models.classifier import ClassifierSpec, DiseaseClassifier, binarise_targets, predict_proba as predict
from amrg.train import LoopConfig, fit

from .common import ARTIFACTS, CHECKPOINTS, Timer, fingerprint, is_phantom, log_history, start, write_resolved

PRE, OUT = ARTIFACTS / "preprocess", ARTIFACTS / "classifier"


def main(argv: list[str] | None = None) -> None:
    params, log = start("train_classifier", argv)
    dist.relaunch(params.runtime.num_processes, "stages.train_classifier", argv)
    c, timer = params.classifier, Timer()
    device = setup_runtime(params.runtime)
    studies, images = load_studies(PRE / "studies.parquet"), load_images(PRE / "images.parquet")
    idx = studies.index()
    labels = torch.from_numpy(studies.labels[[idx[s] for s in images.study_ids]])
    targets = binarise_targets(labels, c.uncertain_as)
    pixels = torch.from_numpy(np.array(images.pixels))
    train, val = np.flatnonzero(images.split == "train"), np.flatnonzero(images.split == "val")

    spec = ClassifierSpec(params.vision.name, dict(params.vision.kwargs), params.data.image_size,
                          params.qformer.dim, params.qformer.layers, params.qformer.heads, params.qformer.n_queries)
    model = DiseaseClassifier(spec, params.vision.pretrained, params.vision.checkpoint).to(device)
    pos_weight = None
    if c.pos_weight:
        pos = targets[train].sum(0)
        pos_weight = ((len(train) - pos) / pos.clamp(min=1)).clamp(max=100).to(device)

    def batch_loss(net: torch.nn.Module, b: torch.Tensor) -> torch.Tensor:
        rows = train[b.numpy()]
        with autocast(device, params.runtime.precision):
            logits = net(pixels[rows].to(device)).float()
        return model.loss(logits, targets[rows].to(device), c.ortho_weight, pos_weight)[0]

    def validate() -> dict[str, float]:
        probs = predict(model, pixels, val, device, params.runtime.precision, c.batch_size)
        t = targets[val].numpy()
        bce = torch.nn.functional.binary_cross_entropy(torch.from_numpy(probs).clamp(1e-6, 1 - 1e-6), targets[val])
        m = multilabel_metrics(t, probs)
        per_label = {f"val_auroc_label/{k}": v["auroc"] for k, v in m["per_label"].items() if v["auroc"] is not None}
        return {"val_loss": float(bce), "val_auroc": m["mean_auroc"] or 0.0, **per_label}

    loop = LoopConfig(c.epochs, c.batch_size, c.lr, c.weight_decay, c.warmup_steps, 1, c.checkpoint_every,
                      params.runtime.seed)
    fp = fingerprint(spec.to_dict(), params.classifier, params.runtime, PRE / "studies.parquet", PRE / "images.parquet")
    best, history = fit(model, len(train), batch_loss, validate, loop, CHECKPOINTS / "train_classifier" / "state.pt",
                        fp, select="val_auroc", mode="max")
    model.load_state_dict(best, strict=False)
    train_seconds = timer()
    if not dist.context().is_main:
        dist.shutdown()
        return

    val_metrics = multilabel_metrics(targets[val].numpy(), predict(model, pixels, val, device, params.runtime.precision, c.batch_size))
    save_tensors(OUT / "model.safetensors", model.state_dict())
    write_json(OUT / "config.json", {"spec": spec.to_dict(), "uncertain_as": c.uncertain_as})
    write_json(OUT / "metrics.json", {"phantom_images": is_phantom(), "val_mean_auroc": val_metrics["mean_auroc"],
                                      "val_mean_ap": val_metrics["mean_ap"], "epochs": len(history),
                                      "train_images_per_s": round(len(train) * len(history) / train_seconds, 1),
                                      "val": val_metrics})
    log_history(OUT, history)
    write_resolved(OUT, vision=params.vision, qformer=params.qformer, classifier=c, runtime=params.runtime)
    log.info("val mean AUROC %.3f after %d epochs (%.0fs)", val_metrics["mean_auroc"] or float("nan"),
             len(history), train_seconds)
    dist.shutdown()


if __name__ == "__main__":
    main()
