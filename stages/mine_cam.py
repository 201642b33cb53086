"""Stage mine_cam (paper III-B, eq. 1): disease-aware regions of the training images.

Targets (``cam.targets``) are the positive observations of each training image's study (``labels``)
or the observations the classifier predicts positive (p > 0.5, ``predictions``). Candidates are ranked by the
classifier's probability for their disease and capped at ``cam.max_per_disease`` *before* any CAM is
computed (no CAM is spent on a region that the cap would drop). For each kept (image, disease) the CAM
method gives a map; patches whose mean activation exceeds ``cam.tau`` are kept and the rest zeroed.

``regions.parquet`` columns: study_id, view, disease (index in CheXpert order), disease_name,
score (classifier probability), patch_mask (packed bits of the ``(S/patch)^2`` keep mask, row-major),
n_patches (kept), pixels (masked uint8 image, fixed-size binary). Regions whose mask keeps no patch
are counted in metrics.json and not written.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from amrg.banks import select_regions
from amrg.cam import CamMiner, apply_mask, overlay_strip_png, patch_mask
from amrg.data.store import image_targets, images_table, load_images, load_studies, with_patch_mask
from amrg.io import progress, read_json, setup_runtime, write_bytes, write_json, write_parquet
from amrg.labels.schema import CHEXPERT_14, DECISION_THRESHOLD, label_slug
from amrg.models.classifier import predict_proba
from amrg.models.load import load_classifier

from .common import Timer, start, write_resolved

# Paper IV-B: "capped at 500 per disease, with a total of 6943 regions for all 14 diseases" (the dataset
# is not named; IU X-ray's training positives cannot reach that many). Shown beside our total.
PAPER_TOTAL_REGIONS = 6943


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
    scores = probs[cand_img, cand_dis]
    keep = select_regions(scores, cand_dis, p.max_per_disease)
    rows, diseases, scores = train[cand_img[keep]], cand_dis[keep], scores[keep]
    log.info("%d candidate regions, %d after the cap of %d per disease", len(cand_dis), len(keep), p.max_per_disease)

    size = int(pixels.shape[-1])
    side = size // p.patch
    miner = CamMiner(model, p.method)
    masks, masked, overlays = [np.zeros((0, side, side), bool)], [np.zeros((0, size, size), np.uint8)], {}
    try:
        for s in progress(range(0, len(rows), p.batch_size), "CAM mining", unit="batch"):
            r, d = rows[s:s + p.batch_size], diseases[s:s + p.batch_size]
            imgs = pixels.read(r)
            cams = miner(torch.from_numpy(imgs).to(device), d.tolist())
            m = patch_mask(cams, p.patch, p.tau)
            masks.append(m), masked.append(apply_mask(imgs, m, p.patch))
            for j, dis in enumerate(d):
                if len(overlays.setdefault(int(dis), [])) < p.n_overlays:
                    overlays[int(dis)].append(overlay_strip_png(imgs[j], cams[j], masked[-1][j]))
    finally:
        miner.close()
    masks, masked = np.concatenate(masks), np.concatenate(masked)
    n_patches = masks.reshape(len(masks), -1).sum(1)
    ok = n_patches > 0

    base = images_table([images.study_ids[r] for r in rows[ok]], images.views[rows[ok]].tolist(),
                        ["train"] * int(ok.sum()), masked[ok])
    table = base.drop(["split"]).append_column("disease", pa.array(diseases[ok], pa.int8())) \
        .append_column("disease_name", pa.array([CHEXPERT_14[d] for d in diseases[ok]])) \
        .append_column("score", pa.array(scores[ok], pa.float32()))
    table = with_patch_mask(table, masks[ok], p.patch).append_column("n_patches", pa.array(n_patches[ok], pa.int16()))
    write_parquet(layout.regions, table)
    for d, pngs in overlays.items():
        for k, png in enumerate(pngs):
            write_bytes(out / "overlays" / f"{label_slug(CHEXPERT_14[d])}_{k}.png", png)

    per = {n: {"candidates": int((cand_dis == j).sum()), "regions": int(((diseases == j) & ok).sum()),
               "empty_masks": int(((diseases == j) & ~ok).sum())} for j, n in enumerate(CHEXPERT_14)}
    write_json(out / "metrics.json", {
        "phantom_images": layout.is_phantom(), "method": p.method, "targets": p.targets, "tau": p.tau,
        "max_per_disease": p.max_per_disease, "regions": int(ok.sum()), "paper_regions_total": PAPER_TOTAL_REGIONS,
        "empty_masks": int((~ok).sum()),
        "mean_kept_patch_fraction": float(n_patches[ok].mean() / side**2) if ok.any() else 0.0,
        "regions_per_s": round(len(rows) / max(timer(), 1e-9), 1), "per_disease": per})
    write_resolved(out, cam=p, runtime=params.runtime)
    log.info("%d regions (%d empty masks skipped) in %.1fs", ok.sum(), (~ok).sum(), timer())


if __name__ == "__main__":
    main()
