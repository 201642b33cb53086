"""Stage train_generator (paper III-C/D, eq. 2-10, 12): Hopfield memories + LLM, autoregressive loss.

Stage-1 features of every training/validation study are computed once (frozen classifier) and
streamed to row files under the checkpoints root (rank 0 writes, every rank reads), so RAM does not grow
with the number of studies; so are seed 004's reconstruction targets. The
trainable parts (visual/query projections, V-/R-Hopfield projections θ_v, θ_r, LoRA adapters when
``llm.trainable = lora``, the whole LM when ``full``) are fitted on the report tokens (eq. 12,
:class:`amrg.tasks.GeneratorTask`). Every epoch is validated by the loss and by BLEU-4, CIDEr, their R2GenGPT
mean and CE F1 (``labels.labeler``, evaluate's convention) of the val reports, decoded greedily or, with
``generator.select_decode: configured``, with the ``decode`` section; ``generator.select`` picks the epoch kept.
The LLM reads [BOS, template text, F, Q, F′, template text] (``generator.prompt_template``, ``embed_norm``,
``views``: :mod:`amrg.models.generator`), which the spec carries to inference. Only trainable weights are
written, with the :class:`~amrg.models.generator.GeneratorSpec` that rebuilds the rest (plus a scratch LM's
tokenizer and config), so a frozen 7B LM adds nothing to the output. ``runtime.num_processes > 1`` runs the stage
data-parallel under torchrun (:mod:`amrg.dist`); it runs as is under ``torchrun``/``accelerate launch`` too.

``generator.tvc_weight`` / ``rec_weight`` > 0 add seed 004's text-to-vision and reconstruction terms
(:mod:`amrg.models.bidirectional`): their heads are built only then, trained beside the generator and
written to ``auxiliary.safetensors``, which inference never reads; at 0 nothing extra is built or computed.
"""

from __future__ import annotations

import resource
import shutil

import torch

from amrg import dist
from amrg.banks import load_banks
from amrg.data.store import TensorRows, load_images, load_studies, write_rows
from amrg.io import save_tensors, setup_runtime, write_json
from amrg.models.bidirectional import AUXILIARY_WEIGHTS, build_auxiliary, pooled_grid, reconstruction_targets
from amrg.models.features import N_VIEWS, write_study_features
from amrg.models.generator import GeneratorSpec, create_generator, llm_dtype
from amrg.models.llm import save_llm
from amrg.models.load import load_classifier
from amrg.tasks import GeneratorTask
from amrg.train import LoopConfig, Selection, balanced_weights, fit

from .common import Timer, fingerprint, log_history, start, write_resolved


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on a GPU, max resident set size on CPU."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


def main(argv: list[str] | None = None) -> None:
    params, log, layout = start("train_generator", argv, relaunch=True)
    g, timer, out = params.generator, Timer(), layout.stage_dir("train_generator")
    device = setup_runtime(params.runtime)
    studies, images = load_studies(layout.studies), load_images(layout.images, layout.pixels)
    classifier = load_classifier(layout.stage_dir("train_classifier"), device)
    grid = pooled_grid(classifier.encoder.grid, g.visual_pool)  # the visual tokens of one view
    features, reports, rec_targets = {}, {}, {}
    cache = layout.checkpoints / "train_generator" / "features"
    for split in ("train", "val"):
        rows = studies.rows(split)
        view_rows = images.study_views([studies.ids[i] for i in rows], N_VIEWS)
        reports[split] = [studies.reports[i] for i in rows]
        if dist.context().is_main:
            write_study_features(classifier, images.pixels, view_rows, g.visual_pool, device, params.runtime.precision,
                                 g.batch_size, cache / split, g.views)
            if g.rec_weight > 0:
                size = (grid[0] * g.rec_patch, grid[1] * g.rec_patch)
                write_rows([cache / split / "rec.npy"], len(view_rows),
                           ((reconstruction_targets(images.pixels, view_rows[s:s + g.batch_size], size),)
                            for s in range(0, len(view_rows), g.batch_size)))
        dist.barrier()
        features[split] = (TensorRows(cache / split / "F.npy"), TensorRows(cache / split / "Fd.npy"))
        if g.rec_weight > 0:
            rec_targets[split] = TensorRows(cache / split / "rec.npy")
    del classifier

    spec = GeneratorSpec(params.llm, params.hopfield, params.banks.index, g.prompt, g.visual_pool,
                         features["train"][0].shape[-1], features["train"][1].shape[-1],
                         llm_dtype(params.llm, params.runtime.precision, device),
                         prompt_template=g.prompt_template, embed_norm=g.embed_norm, views=g.views)
    model = create_generator(spec, *load_banks(layout, params.hopfield), train_texts=reports["train"]).to(device)
    aux = build_auxiliary(g, model, N_VIEWS, grid, params.runtime.seed)  # None (nothing built) at tvc = rec = 0
    task = GeneratorTask(model, features, reports, g.max_report_tokens, g.batch_size, device, params.runtime.precision,
                         vtc_weight=g.vtc_weight, tvc_weight=g.tvc_weight, rec_weight=g.rec_weight, aux=aux,
                         rec_targets=rec_targets or None, labels=params.labels,
                         ce_uncertain_as=params.evaluate.ce_uncertain_as, ce_labels=params.evaluate.ce_labels,
                         decode=params.decode, select_decode=g.select_decode, word_dropout=g.word_dropout)
    loop = LoopConfig(g.epochs, g.batch_size, g.lr, g.weight_decay, g.warmup_steps, g.grad_accum,
                      g.checkpoint_every, params.runtime.seed)
    # what the kept-epoch scores depend on besides the generator: the CE labeler and convention, the val decoding
    scoring = (params.labels, params.evaluate.ce_uncertain_as, params.evaluate.ce_labels,
               params.decode if g.select_decode == "configured" else None)
    fp = fingerprint(params.generator, spec.to_dict(), params.runtime, layout.studies, layout.images, layout.pixels,
                     layout.classifier_weights, layout.visual_bank, layout.report_bank, scoring)
    fit_timer = Timer()
    # class-balanced epochs (generator.balance > 0): studies drawn by their rarest finding's repeat factor
    weights = balanced_weights(studies.labels[studies.rows("train")], g.balance)
    fitted = fit(task.trainee, len(reports["train"]), task.batch_loss, task.validate, loop,
                 layout.checkpoint("train_generator"), fp, Selection.of(g.select), sample_weights=weights)
    fit_seconds, seconds = fit_timer(), timer()
    dist.barrier()  # every rank is done reading the features
    if not dist.context().is_main:
        dist.shutdown()
        return
    shutil.rmtree(cache, ignore_errors=True)
    weights, aux_weights = task.split_state(fitted.best_state)
    save_tensors(layout.generator_weights, weights)
    if aux is not None:  # training-only heads (TVC / REC): kept apart, never loaded for generation
        save_tensors(out / AUXILIARY_WEIGHTS, aux_weights)
    else:
        (out / AUXILIARY_WEIGHTS).unlink(missing_ok=True)  # an earlier run's, outside DVC
    save_llm(out, params.llm, model.llm, model.tokenizer)
    write_json(layout.generator_config, {"spec": spec.to_dict()})
    n_trainable, kept = sum(v.numel() for v in weights.values()), fitted.best
    objective = {}
    if task.terms:  # not plain VTC: the weights, the kept epoch's terms and the auxiliary heads' size
        terms = {f"{s}_{t}": kept[f"{s}_{t}"] for s in ("train", "val") for t in task.terms if f"{s}_{t}" in kept}
        objective = {"loss_weights": task.weights, "best_terms": terms,
                     "auxiliary_parameters": sum(v.numel() for v in aux_weights.values())}
    write_json(out / "metrics.json", {
        "phantom_images": layout.is_phantom(), "select": g.select, "best_epoch": kept["epoch"],
        "select_decode": g.select_decode, "best_val_loss": kept["val_loss"], "best_val_bleu4": kept["val_bleu4"],
        "best_val_cider": kept["val_cider"], "best_val_ce_f1": kept["val_ce_f1"],
        "epochs": len(fitted.history), "trainable_parameters": n_trainable, "processes": dist.context().world,
        "llm_dtype": spec.dtype,
        "train_samples_per_s": round(len(reports["train"]) * len(fitted.history) / fit_seconds, 1),  # incl. validation
        "peak_memory_mb": peak_memory_mb(device), "seconds": seconds, **objective})
    log_history(out, fitted.history)
    write_resolved(out, generator=g, llm=params.llm, hopfield=params.hopfield, banks_index=params.banks.index,
                   runtime=params.runtime)
    log.info("generator: kept epoch %d (%s), val loss %.4f, %d trainable parameters, %.0fs", kept["epoch"],
             g.select, kept["val_loss"], n_trainable, seconds)
    dist.shutdown()


if __name__ == "__main__":
    main()
