"""Stage train_classifier (paper III-B, eq. 11): Swin encoder -> Q-Former (14 disease queries) -> head.

Trains on every image of the training studies (each image carries its study's labels) with BCE +
orthogonality loss (:class:`amrg.tasks.ClassifierTask`; ``classifier.ortho_on``: on the queries or on each
image's disease features), keeps the epoch with the best validation mean AUROC, and writes the weights
(safetensors), the architecture spec, validation metrics and the loss/AUROC history (with each epoch's
mean BCE and orthogonality terms). The Q-Former is ``qformer.kind`` (scratch, or BLIP-2's, optionally
initialised from ``qformer.pretrained``). The input size is the preprocessed images' own. Runs
data-parallel under torchrun when ``runtime.num_processes > 1`` (:mod:`amrg.dist`).

Training input (issue 19): batches are read ahead of the step by :meth:`amrg.tasks.ClassifierTask.loader`
(``runtime.loader_workers`` processes, pinned memory and non-blocking copies on CUDA); on CUDA a convolutional
encoder is held channels-last (:func:`memory_layout`); metrics.json reports the peak memory (CUDA allocator
peak, or max RSS on CPU).
"""

from __future__ import annotations


import numpy as np
import torch

from amrg import dist
from amrg.data.store import image_targets, load_images, load_studies
from amrg.io import save_tensors, setup_runtime, write_json
from amrg.metrics.classification import multilabel_metrics
from amrg.models.classifier import ClassifierSpec, DiseaseClassifier, positive_weights
from amrg.tasks import ClassifierTask
from amrg.train import LoopConfig, Selection, fit

from .common import Timer, fingerprint, log_history, peak_memory_mb, start, write_resolved



def is_conv_model(encoder: torch.nn.Module) -> bool:
    """A convolutional backbone: more than one ``Conv2d`` (Swin and ViT have exactly one, the patch embedding)."""
    return sum(isinstance(m, torch.nn.Conv2d) for m in encoder.modules()) > 1


def memory_layout(model: DiseaseClassifier, device: torch.device) -> DiseaseClassifier:
    """Channels-last weights for a convolutional encoder on CUDA (cuDNN's NHWC kernels, tensor cores under
    bf16; the convolutions then run channels-last whatever the input's layout). Elsewhere, and for Swin/ViT,
    nothing changes. Saved weights are the same values (``save_tensors`` writes contiguous tensors)."""
    if device.type == "cuda" and is_conv_model(model.encoder):
        model.encoder.to(memory_format=torch.channels_last)
    return model


def main(argv: list[str] | None = None) -> None:
    params, log, layout = start("train_classifier", argv, relaunch=True)
    c, timer, out = params.classifier, Timer(), layout.stage_dir("train_classifier")
    device = setup_runtime(params.runtime)
    studies, images = load_studies(layout.studies), load_images(layout.images, layout.pixels)
    targets = torch.from_numpy(image_targets(studies, images, np.arange(len(images.split)), c.uncertain_as))
    pixels = images.pixels  # read by batch from the pixel store, never copied whole
    train, val = np.flatnonzero(images.split == "train"), np.flatnonzero(images.split == "val")

    q = params.qformer
    spec = ClassifierSpec(params.vision.name, dict(params.vision.kwargs), int(pixels.shape[-1]),
                          q.dim, q.layers, q.heads, q.n_queries, q.kind, q.cross_attention_frequency)
    model = DiseaseClassifier(spec, params.vision.pretrained, params.vision.checkpoint, q.pretrained).to(device)
    model = memory_layout(model, device)
    spec = model.spec  # a BLIP-2 Q-Former's spec holds its config
    pos_weight = positive_weights(targets[train], c.pos_weight_cap).to(device) if c.pos_weight else None
    task = ClassifierTask(model, pixels, targets, train, val, c.ortho_weight, pos_weight, c.batch_size, device,
                          params.runtime.precision, params.runtime.loader_workers, c.ortho_on)

    loop = LoopConfig(c.epochs, c.batch_size, c.lr, c.weight_decay, c.warmup_steps, 1, c.checkpoint_every,
                      params.runtime.seed)
    fp = fingerprint(spec.to_dict(), params.classifier, params.runtime, layout.studies, layout.images, layout.pixels)
    fitted = fit(model, len(train), task.batch_loss, task.validate, loop, layout.checkpoint("train_classifier"), fp,
                 Selection.of("val_auroc"), loader=task.loader)
    model.load_state_dict(fitted.best_state, strict=False)
    train_seconds = timer()
    if not dist.context().is_main:
        dist.shutdown()
        return

    val_metrics = multilabel_metrics(targets[val].numpy(), task.probabilities(val))
    save_tensors(layout.classifier_weights, model.state_dict())
    write_json(layout.classifier_config, {"spec": spec.to_dict(), "uncertain_as": c.uncertain_as})
    write_json(out / "metrics.json", {"phantom_images": layout.is_phantom(), "val_mean_auroc": val_metrics["mean_auroc"],
                                      "val_mean_ap": val_metrics["mean_ap"], "epochs": len(fitted.history),
                                      "best_epoch": fitted.best["epoch"], "ortho_on": c.ortho_on,
                                      "train_ortho": fitted.best.get("train_ortho"),
                                      "train_images_per_s": round(len(train) * len(fitted.history) / train_seconds, 1),
                                      "peak_memory_mb": peak_memory_mb(device),
                                      "val": val_metrics})
    log_history(out, fitted.history)
    write_resolved(out, vision=params.vision, qformer=params.qformer, classifier=c, runtime=params.runtime)
    log.info("val mean AUROC %.3f after %d epochs (kept epoch %d, %.0fs)", val_metrics["mean_auroc"] or float("nan"),
             len(fitted.history), fitted.best["epoch"], train_seconds)
    dist.shutdown()


if __name__ == "__main__":
    main()
