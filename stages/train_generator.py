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

``generator_vision`` (seed 002 C0/C4) chooses the encoder of F: ``classifier`` (the default, everything above;
nothing else is built), ``pretrained`` (the end of the pre-training chain, ``artifacts/pretrain/contrastive``)
or ``timm``. Frozen, its F is cached like the classifier's; ``trainable``, F is computed in the step from the
studies' view pixels (read ahead by fit's loader; resized on the device to the encoder's size) and the encoder
is trained with the generator at ``generator_vision.lr``. F_d always comes from the frozen classifier. Its
weights go to ``vision.safetensors`` (frozen or not) and its spec into the generator's, so inference needs no
pre-training output. ``generator.query_tokens: false`` drops Q from the prefix.
"""

from __future__ import annotations

import shutil

from amrg import dist
from amrg.banks import load_banks
from amrg.data.store import TensorRows, load_images, load_studies, write_rows
from amrg.io import save_tensors, setup_runtime, write_json
from amrg.models.bidirectional import AUXILIARY_WEIGHTS, build_auxiliary, pooled_grid, reconstruction_targets
from amrg.models.features import N_VIEWS, VISION_WEIGHTS, write_disease_features, write_study_features
from amrg.models.generator import GeneratorSpec, create_generator, llm_dtype
from amrg.models.llm import save_llm
from amrg.models.load import build_generator_vision, generator_vision_files, load_classifier
from amrg.tasks import GeneratorTask, WithVision
from amrg.train import LoopConfig, Selection, balanced_weights, fit

from .common import Timer, fingerprint, log_history, peak_memory_mb, start, write_resolved



def main(argv: list[str] | None = None) -> None:
    params, log, layout = start("train_generator", argv, relaunch=True)
    g, gv, timer, out = params.generator, params.generator_vision, Timer(), layout.stage_dir("train_generator")
    device = setup_runtime(params.runtime)
    studies, images = load_studies(layout.studies), load_images(layout.images, layout.pixels)
    classifier = load_classifier(layout.stage_dir("train_classifier"), device)
    # the generator-side encoder of F (None: the classifier's); built under its own RNG
    vision = build_generator_vision(gv, layout, images.pixels.shape[-1], g.visual_pool, g.views, params.runtime.seed)
    vspec, tower = vision if vision is not None else (None, None)
    tower = tower.to(device) if tower is not None else None
    trains_vision = tower is not None and gv.trainable
    grid = pooled_grid((tower.encoder if tower is not None else classifier.encoder).grid, g.visual_pool)  # one view
    features, reports, rec_targets, view_pixels = {}, {}, {}, {}
    cache = layout.checkpoints / "train_generator" / "features"
    for split in ("train", "val"):
        rows = studies.rows(split)
        view_rows = images.study_views([studies.ids[i] for i in rows], N_VIEWS)
        reports[split], view_pixels[split] = [studies.reports[i] for i in rows], (images.pixels, view_rows)
        if dist.context().is_main:
            if trains_vision:  # F is computed in the step: only F_d is cached
                write_disease_features(classifier, images.pixels, view_rows, device, params.runtime.precision,
                                       g.batch_size, cache / split)
            else:
                write_study_features(classifier, images.pixels, view_rows, g.visual_pool, device,
                                     params.runtime.precision, g.batch_size, cache / split, g.views, tower)
            if g.rec_weight > 0:
                size = (grid[0] * g.rec_patch, grid[1] * g.rec_patch)
                write_rows([cache / split / "rec.npy"], len(view_rows),
                           ((reconstruction_targets(images.pixels, view_rows[s:s + g.batch_size], size),)
                            for s in range(0, len(view_rows), g.batch_size)))
        dist.barrier()
        features[split] = (None if trains_vision else TensorRows(cache / split / "F.npy"),
                           TensorRows(cache / split / "Fd.npy"))
        if g.rec_weight > 0:
            rec_targets[split] = TensorRows(cache / split / "rec.npy")
    del classifier
    if tower is not None and not trains_vision:
        tower = tower.cpu()  # its F is cached; kept only to write its weights

    visual_dim = tower.width if tower is not None else features["train"][0].shape[-1]
    spec = GeneratorSpec(params.llm, params.hopfield, params.banks.index, g.prompt, g.visual_pool,
                         visual_dim, features["train"][1].shape[-1],
                         llm_dtype(params.llm, params.runtime.precision, device),
                         prompt_template=g.prompt_template, embed_norm=g.embed_norm, views=g.views,
                         query_tokens=g.query_tokens, vision=vspec)
    model = create_generator(spec, *load_banks(layout, params.hopfield), train_texts=reports["train"]).to(device)
    aux = build_auxiliary(g, model, N_VIEWS, grid, params.runtime.seed)  # None (nothing built) at tvc = rec = 0
    task = GeneratorTask(model, features, reports, g.max_report_tokens, g.batch_size, device, params.runtime.precision,
                         vtc_weight=g.vtc_weight, tvc_weight=g.tvc_weight, rec_weight=g.rec_weight, aux=aux,
                         rec_targets=rec_targets or None, labels=params.labels,
                         ce_uncertain_as=params.evaluate.ce_uncertain_as, ce_labels=params.evaluate.ce_labels,
                         decode=params.decode, select_decode=g.select_decode, word_dropout=g.word_dropout,
                         vision=tower if trains_vision else None, view_pixels=view_pixels if trains_vision else None,
                         loader_workers=params.runtime.loader_workers)
    # a trained encoder: its own AdamW param group (generator_vision.lr, null: generator.lr)
    lr_by_prefix = {WithVision.PREFIX: gv.lr if gv.lr is not None else g.lr} if trains_vision else {}
    loop = LoopConfig(g.epochs, g.batch_size, g.lr, g.weight_decay, g.warmup_steps, g.grad_accum,
                      g.checkpoint_every, params.runtime.seed, lr_by_prefix=lr_by_prefix)
    # what the kept-epoch scores depend on besides the generator: the CE labeler and convention, the val decoding
    scoring = (params.labels, params.evaluate.ce_uncertain_as, params.evaluate.ce_labels,
               params.decode if g.select_decode == "configured" else None)
    fp = fingerprint(params.generator, spec.to_dict(), params.runtime, layout.studies, layout.images, layout.pixels,
                     layout.classifier_weights, layout.visual_bank, layout.report_bank, scoring, params.generator_vision,
                     *generator_vision_files(gv, layout))
    fit_timer = Timer()
    # class-balanced epochs (generator.balance > 0): studies drawn by their rarest finding's repeat factor
    weights = balanced_weights(studies.labels[studies.rows("train")], g.balance)
    fitted = fit(task.trainee, len(reports["train"]), task.batch_loss, task.validate, loop,
                 layout.checkpoint("train_generator"), fp, Selection.of(g.select), sample_weights=weights,
                 loader=task.loader if trains_vision else None)
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
    if tower is not None:  # the generator-side encoder, frozen or trained (the kept epoch's weights)
        if trains_vision:
            tower.load_state_dict(task.vision_state(fitted.best_state), strict=False)
        save_tensors(out / VISION_WEIGHTS, tower.encoder.state_dict())
    else:
        (out / VISION_WEIGHTS).unlink(missing_ok=True)
    save_llm(out, params.llm, model.llm, model.tokenizer)
    write_json(layout.generator_config, {"spec": spec.to_dict()})
    n_trainable, kept = sum(v.numel() for v in weights.values()), fitted.best
    n_vision = 0 if tower is None else sum(p.numel() for p in tower.parameters())
    objective = {}
    if task.terms:  # not plain VTC: the weights, the kept epoch's terms and the auxiliary heads' size
        terms = {f"{s}_{t}": kept[f"{s}_{t}"] for s in ("train", "val") for t in task.terms if f"{s}_{t}" in kept}
        objective = {"loss_weights": task.weights, "best_terms": terms,
                     "auxiliary_parameters": sum(v.numel() for v in aux_weights.values())}
    write_json(out / "metrics.json", {
        "phantom_images": layout.is_phantom(), "select": g.select, "best_epoch": kept["epoch"],
        "select_decode": g.select_decode, "best_val_loss": kept["val_loss"], "best_val_bleu4": kept["val_bleu4"],
        "best_val_cider": kept["val_cider"], "best_val_ce_f1": kept["val_ce_f1"],
        # what training fitted: the generator's saved weights, plus the encoder's when it trained
        "epochs": len(fitted.history), "trainable_parameters": n_trainable + (n_vision if trains_vision else 0),
        "processes": dist.context().world,
        # every parameter the generator uses (incl. a frozen LLM) and the generator-side encoder's
        "total_parameters": sum(p.numel() for p in model.parameters()) + n_vision,
        "generator_vision": gv.source, "vision_parameters": n_vision,
        "vision_trainable_parameters": n_vision if trains_vision else 0,
        "llm_dtype": spec.dtype,
        "train_samples_per_s": round(len(reports["train"]) * len(fitted.history) / fit_seconds, 1),  # incl. validation
        "peak_memory_mb": peak_memory_mb(device), "seconds": seconds, **objective})
    log_history(out, fitted.history)
    write_resolved(out, generator=g, generator_vision=gv, llm=params.llm, hopfield=params.hopfield,
                   banks_index=params.banks.index, runtime=params.runtime)
    log.info("generator: kept epoch %d (%s), val loss %.4f, %d trainable parameters, %.0fs", kept["epoch"],
             g.select, kept["val_loss"], n_trainable, seconds)
    dist.shutdown()


if __name__ == "__main__":
    main()
