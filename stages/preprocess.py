"""Stage preprocess (paper IV-A): dataset -> cleaned reports, CheXpert-14 labels, decoded images.

Reads the dataset through its adapter, cleans reports the R2Gen way, labels them, decodes every image
once to uint8 at ``data.image_size`` (or, with no ``data.images_dir``, draws a phantom radiograph from
the study's labels), and writes ``studies.parquet``, ``images.parquet`` and ``stats.json`` (counts and
every skip with its reason).
"""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pyarrow as pa

from amrg.data.adapters import limit_per_split, load_dataset
from amrg.data.images import ImageError, decode_many
from amrg.data.phantoms import PHANTOM_NOTE, draw_phantoms, phantom_seed
from amrg.data.schema import SPLITS, Skip
from amrg.data.store import images_table
from amrg.io import write_json, write_parquet
from amrg.labels import label
from amrg.labels.schema import CHEXPERT_14, LABEL_COLUMNS

from amrg.io import resolve_device
from amrg.layout import PHANTOM_FLAG

from .common import Timer, start, write_resolved


def main(argv: list[str] | None = None) -> None:
    params, log, layout = start("preprocess", argv)
    p, timer, out = params.data, Timer(), layout.stage_dir("preprocess")
    studies, skips = load_dataset(p.dataset, p.annotation)
    if p.max_studies:
        studies = limit_per_split(studies, p.max_studies)
    labels = label([s.report for s in studies], params.labels.labeler, device=str(resolve_device(params.runtime.device)),
                   **params.labels.options())

    phantom = p.images_dir is None
    kept, pixels, img_ids, img_views, img_splits = [], [], [], [], []
    if phantom:  # one seed per study: both views show the same findings in the same place
        jobs = []
        for i, s in enumerate(studies):
            seed = phantom_seed(s.id, params.runtime.seed)
            for v in range(len(s.image_paths)):
                jobs.append((labels[i], v % 2, p.image_size, seed))
                img_ids.append(s.id), img_views.append(v), img_splits.append(s.split)
            kept.append(i)
        pixels = draw_phantoms(jobs, params.runtime.num_threads)
    else:
        refs = [(i, v, path) for i, s in enumerate(studies) for v, path in enumerate(s.image_paths)]
        workers = params.runtime.num_threads or os.cpu_count() or 1  # decoding threads (0: one per core)
        decoded = decode_many(p.images_dir, [r[2] for r in refs], p.image_size, workers)
        ok_studies = set()
        for (i, v, path), img in zip(refs, decoded):
            if isinstance(img, ImageError):
                skips.append(Skip(studies[i].id, img.reason, img.detail))
                continue
            pixels.append(img)
            img_ids.append(studies[i].id), img_views.append(v), img_splits.append(studies[i].split)
            ok_studies.add(i)
        for i, s in enumerate(studies):
            if i not in ok_studies:
                skips.append(Skip(s.id, "no_readable_image", f"{len(s.image_paths)} listed, none readable"))
        kept = sorted(ok_studies)
    for sk in skips:
        log.warning("skip %s: %s %s", sk.id, sk.reason, sk.detail)

    studies, labels = [studies[i] for i in kept], labels[kept]
    n_images = Counter(img_ids)
    table = {"id": [s.id for s in studies], "split": [s.split for s in studies],
             "report": [s.report for s in studies], "findings": [s.findings for s in studies],
             "impression": [s.impression for s in studies],
             "n_images": [n_images[s.id] for s in studies]}
    table.update({col: pa.array(labels[:, j], pa.float32()) for j, col in enumerate(LABEL_COLUMNS)})
    write_parquet(layout.studies, table)
    write_parquet(layout.images, images_table(img_ids, img_views, img_splits, np.stack(pixels)))

    split_arr = np.array([s.split for s in studies])
    stats = {
        PHANTOM_FLAG: phantom,
        "note": PHANTOM_NOTE if phantom else f"images decoded from {p.images_dir}",
        "dataset": p.dataset,
        "studies": {sp: int((split_arr == sp).sum()) for sp in SPLITS},
        "images": {sp: img_splits.count(sp) for sp in SPLITS},
        "skipped": len(skips),
        "skipped_by_reason": dict(Counter(s.reason for s in skips)),
        "skips": [s.as_dict() for s in skips],
        "label_positive_train": {n: int((labels[split_arr == "train", j] == 1).sum()) for j, n in enumerate(CHEXPERT_14)},
        "seconds": timer(),
    }
    write_json(layout.stats, stats)
    write_resolved(out, data=p, labels=params.labels, runtime=params.runtime)
    log.info("studies %s, images %s, skipped %d (%s)%s", stats["studies"], stats["images"], len(skips),
             stats["skipped_by_reason"], " [PHANTOM images]" if phantom else "")


if __name__ == "__main__":
    main()
