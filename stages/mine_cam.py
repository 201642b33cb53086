"""Stage mine_cam (paper III-B, eq. 1): disease-aware regions of the training images.

Targets (``cam.targets``) are the positive observations of each training image's study (``labels``)
or the observations the classifier predicts positive (p > 0.5, ``predictions``). For each (image, disease)
the CAM method gives a map; patches whose mean activation exceeds ``cam.tau`` are kept (at most the
``cam.max_patches`` highest, IV-E's top six; 0: all) and the rest zeroed. A mask that keeps no patch is
dropped, and then each disease keeps ``cam.max_per_disease`` regions (IV-B's cap of 500): the most
confident by classifier probability or a ``runtime.seed`` random sample (``cam.select``, the released code's
``random.sample``; :func:`amrg.banks.select_regions`).

The result is that of "mine every candidate, drop the empty masks, cap", but CAMs are computed in rounds:
round 1 mines the candidates the cap would keep if no mask were empty; each later round mines, for the
diseases that lost regions to empty masks, the next candidates in the cap's order, until every disease has
its ``max_per_disease`` regions or no candidate is left. No CAM is spent beyond the cap's need.

``regions.parquet`` columns: study_id, view, disease (index in CheXpert order), disease_name,
score (classifier probability), patch_mask (packed bits of the ``(S/patch)^2`` keep mask, row-major),
n_patches (kept), pixels (masked uint8 image, fixed-size binary); its schema metadata carries the rule
(:func:`mining_rule`, read back by :func:`amrg.banks.read_region_rule`). Empty masks are counted in
metrics.json and not written.
"""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import torch

from amrg.banks import select_regions, with_region_rule
from amrg.cam import CamMiner, apply_mask, overlay_strip_png, patch_mask
from amrg.config import Cam
from amrg.data.store import image_targets, images_table, load_images, load_studies, with_patch_mask
from amrg.io import progress, read_json, setup_runtime, write_bytes, write_json, write_parquet
from amrg.labels.schema import CHEXPERT_14, DECISION_THRESHOLD, label_slug
from amrg.models.classifier import predict_proba
from amrg.models.load import load_classifier

from .common import Timer, start, write_resolved

# Paper IV-B: "capped at 500 per disease, with a total of 6943 regions for all 14 diseases" (the dataset
# is not named; IU X-ray's training positives cannot reach that many). Shown beside our total.
PAPER_TOTAL_REGIONS = 6943


def mining_rule(p: Cam, seed: int) -> dict:
    """The rule that makes ``regions.parquet``: in its schema metadata, metrics.json and the visual bank.
    ``seed`` is the one of the random cap (None for ``select: confident``, which does not draw)."""
    return {"method": p.method, "targets": p.targets, "patch": p.patch, "tau": p.tau, "max_patches": p.max_patches,
            "max_per_disease": p.max_per_disease, "select": p.select,
            "seed": int(seed) if p.select == "random" else None}


def main(argv: list[str] | None = None) -> None:
    params, log, layout = start("mine_cam", argv)
    p, timer, out = params.cam, Timer(), layout.stage_dir("mine_cam")
    device = setup_runtime(params.runtime)
    studies, images = load_studies(layout.studies), load_images(layout.images, layout.pixels)
    model = load_classifier(layout.stage_dir("train_classifier"), device)
    train = np.flatnonzero(images.split == "train")
    targets = image_targets(studies, images, train, read_json(layout.classifier_config)["uncertain_as"])
    pixels = images.pixels  # read by batch from the pixel store
    probs = predict_proba(model, pixels, train, device, params.runtime.precision, p.batch_size)

    positive = targets > 0 if p.targets == "labels" else probs > DECISION_THRESHOLD
    cand_img, cand_dis = np.nonzero(positive)  # (row in train, disease) for every target
    cand_rows, scores = train[cand_img], probs[cand_img, cand_dis]
    rule = mining_rule(p, params.runtime.seed)

    size = int(pixels.shape[-1])
    side = size // p.patch
    mined, empty = np.zeros(len(scores), bool), np.zeros(len(scores), bool)
    done, masks, masked, overlays = [np.zeros(0, np.int64)], [np.zeros((0, side, side), bool)], \
        [np.zeros((0, size, size), np.uint8)], {}
    miner = CamMiner(model, p.method, p.backend, params.runtime.precision)
    try:
        for round_ in itertools.count(1):  # each round mines >= 1 new candidate, or ends the loop
            keep = select_regions(scores, cand_dis, p.max_per_disease, p.select, params.runtime.seed, eligible=~empty)
            todo = keep[~mined[keep]]  # what the cap keeps now among the masks not known to be empty
            if not len(todo):
                break
            log.info("round %d: %d CAMs (%d candidates, %d empty masks so far)", round_, len(todo), len(scores),
                     empty.sum())
            for s in progress(range(0, len(todo), p.batch_size), f"CAM mining, round {round_}", unit="batch"):
                b = todo[s:s + p.batch_size]
                imgs, d = pixels.read(cand_rows[b]), cand_dis[b]
                cams = miner(torch.from_numpy(imgs).to(device), d.tolist())
                m = patch_mask(cams, p.patch, p.tau, p.max_patches)
                x = apply_mask(imgs, m, p.patch)
                mined[b], empty[b] = True, ~m.any(axis=(1, 2))
                ok = ~empty[b]
                done.append(b[ok]), masks.append(m[ok]), masked.append(x[ok])
                for j, dis in enumerate(d):
                    if len(overlays.setdefault(int(dis), [])) < p.n_overlays:
                        overlays[int(dis)].append(overlay_strip_png(imgs[j], cams[j], x[j]))
    finally:
        miner.close()
    done, masks, masked = np.concatenate(done), np.concatenate(masks), np.concatenate(masked)
    order = np.argsort(done)
    at = order[np.searchsorted(done, keep, sorter=order)]  # where each kept candidate's mask is (all are mined)
    rows, diseases, scores_kept, masks, masked = cand_rows[keep], cand_dis[keep], scores[keep], masks[at], masked[at]
    n_patches = masks.reshape(len(masks), side * side).sum(1)
    log.info("%d candidate regions, %d CAMs, %d regions after the cap of %d per disease (%s)", len(scores),
             mined.sum(), len(keep), p.max_per_disease, p.select)

    base = images_table([images.study_ids[r] for r in rows], images.views[rows].tolist(), ["train"] * len(rows), masked)
    table = base.drop(["split"]).append_column("disease", pa.array(diseases, pa.int8())) \
        .append_column("disease_name", pa.array([CHEXPERT_14[d] for d in diseases])) \
        .append_column("score", pa.array(scores_kept, pa.float32()))
    table = with_patch_mask(table, masks, p.patch).append_column("n_patches", pa.array(n_patches, pa.int16()))
    write_parquet(layout.regions, with_region_rule(table, rule))
    for d, pngs in overlays.items():
        for k, png in enumerate(pngs):
            write_bytes(out / "overlays" / f"{label_slug(CHEXPERT_14[d])}_{k}.png", png)

    per = {n: {"candidates": int((cand_dis == j).sum()), "mined": int((mined & (cand_dis == j)).sum()),
               "regions": int((diseases == j).sum()), "empty_masks": int((empty & (cand_dis == j)).sum())}
           for j, n in enumerate(CHEXPERT_14)}
    write_json(out / "metrics.json", {
        "phantom_images": layout.is_phantom(), **rule, "regions": len(keep), "paper_regions_total": PAPER_TOTAL_REGIONS,
        "mined": int(mined.sum()), "empty_masks": int(empty.sum()),
        "mean_kept_patch_fraction": float(n_patches.mean() / side**2) if len(keep) else 0.0,
        "regions_per_s": round(int(mined.sum()) / max(timer(), 1e-9), 1), "per_disease": per})
    write_resolved(out, cam=p, runtime=params.runtime)
    log.info("%d regions (%d empty masks skipped) in %.1fs", len(keep), empty.sum(), timer())


if __name__ == "__main__":
    main()
