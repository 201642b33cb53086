"""Stage preprocess (paper IV-A): dataset -> cleaned reports, CheXpert-14 labels, decoded images.

The dataset's builder (``data.dataset``, :mod:`amrg.data.builders`) reads its own files into studies
and counted skips; reports are labelled by ``labels.labeler`` (CE's reference labels) and the
classifier's targets are those labels or the dataset's own (``labels.source``). Every image is decoded
once to uint8 at ``data.image_size`` (``data.images: files``) or drawn as a phantom radiograph from its
study's targets (``phantom``), chunk by chunk in a process pool (:mod:`amrg.data.chunks`): memory is a
chunk per worker, a killed run resumes from its last finished chunk, and the output is byte-identical
to an uninterrupted run. Writes ``studies.parquet``, ``images.parquet`` + ``pixels.npy`` (the pixel
store every later stage reads by rows), ``stats.json`` (counts, the dataset checks, every skip with its
reason) and ``timing.json`` (the one output that differs between runs).
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from functools import partial

import numpy as np
import pyarrow as pa

from amrg.data.builders import build_dataset, limit_per_split
from amrg.data.checks import check_dataset, log_checks
from amrg.data.chunks import decode_chunk, phantom_chunk, produce
from amrg.data.phantoms import PHANTOM_NOTE, phantom_seed
from amrg.data.schema import SPLITS, Skip, Study
from amrg.data.store import RowWriter
from amrg.io import resolve_device, write_json, write_parquet
from amrg.labels import label
from amrg.labels.schema import CHEXPERT_14, LABEL_COLUMNS, TARGET_COLUMNS
from amrg.layout import PHANTOM_FLAG

from .common import Timer, fingerprint, start, write_resolved

LOGGED_SKIPS = 50  # skips written to the log one by one; stats.json lists every one


def classifier_targets(studies: list[Study], labels: np.ndarray, source: str) -> tuple[np.ndarray, list[int], list[Skip]]:
    """The classifier's targets: the labeler's ``labels``, or each study's dataset labels (``source:
    dataset``); a study without dataset labels is then a counted skip. Returns (targets, kept, skips)."""
    if source == "labeler":
        return labels, list(range(len(studies))), []
    kept = [i for i, s in enumerate(studies) if s.labels is not None]
    skips = [Skip(s.id, "no_dataset_labels", "labels.source=dataset and the dataset has no labels for it")
             for s in studies if s.labels is None]
    if not kept:
        raise ValueError("labels.source=dataset but the dataset ships no CheXpert labels for any study: "
                         "use labels.source=labeler")
    out = np.full_like(labels, np.nan)
    out[kept] = np.asarray([studies[i].labels for i in kept], dtype=np.float32)
    return out, kept, skips


def main(argv: list[str] | None = None) -> None:
    params, log, layout = start("preprocess", argv)
    p, timer, out = params.data, Timer(), layout.stage_dir("preprocess")
    studies, skips = build_dataset(p)
    if p.max_studies:
        studies = limit_per_split(studies, p.max_studies)
    labels = label([s.report for s in studies], params.labels.labeler, device=str(resolve_device(params.runtime.device)),
                   **params.labels.options())
    targets, kept, no_labels = classifier_targets(studies, labels, params.labels.source)
    studies, labels, targets, skips = [studies[i] for i in kept], labels[kept], targets[kept], skips + no_labels

    # one job per image, in images.parquet's row order
    refs = [(i, v) for i, s in enumerate(studies) for v in range(len(s.image_paths))]
    phantom = p.images == "phantom"
    if phantom:  # one seed per study: both views show the same findings in the same place
        jobs = [(targets[i].tolist(), v % 2, phantom_seed(studies[i].id, params.runtime.seed)) for i, v in refs]
        make = partial(phantom_chunk, size=p.image_size)
    else:
        jobs = [studies[i].image_paths[v] for i, v in refs]
        make = partial(decode_chunk, root=p.image_root, size=p.image_size)
    fp = fingerprint({"images": p.images, "root": p.image_root, "size": p.image_size, "chunk": p.chunk_images,
                      "jobs": jobs})
    workdir = layout.checkpoints / "preprocess"
    decode_timer = Timer()
    chunk_files, errors = produce(jobs, make, workdir, p.chunk_images, p.workers or os.cpu_count() or 1, fp,
                                  "draw phantom images" if phantom else "decode images")
    pool_seconds = decode_timer()

    failed = {j for j, _, _ in errors}
    skips += [Skip(studies[refs[j][0]].id, reason, detail) for j, reason, detail in errors]
    ok = [j for j in range(len(refs)) if j not in failed]
    with_image = sorted({refs[j][0] for j in ok})
    has_image = set(with_image)
    skips += [Skip(s.id, "no_readable_image", f"{len(s.image_paths)} listed, none readable")
              for i, s in enumerate(studies) if i not in has_image]
    for sk in skips[:LOGGED_SKIPS]:
        log.warning("skip %s: %s %s", sk.id, sk.reason, sk.detail)
    if len(skips) > LOGGED_SKIPS:
        log.warning("... %d skips in all (stats.json lists every one)", len(skips))

    img_rows = [refs[j] for j in ok]
    img_splits = [studies[i].split for i, _ in img_rows]
    n_images = Counter(studies[i].id for i, _ in img_rows)
    write_parquet(layout.images, {
        "study_id": [studies[i].id for i, _ in img_rows], "view": pa.array([v for _, v in img_rows], pa.int8()),
        "view_position": [(studies[i].views[v] if v < len(studies[i].views) else "") for i, v in img_rows],
        "split": img_splits})
    with RowWriter(layout.pixels, len(ok), (p.image_size, p.image_size), np.uint8) as w:
        for f in chunk_files:
            w.copy_rows(f)
    shutil.rmtree(workdir)
    decode_seconds = decode_timer()  # decoding (or drawing) in the pool, and assembling the store

    studies, labels, targets = [studies[i] for i in with_image], labels[with_image], targets[with_image]
    table = {"id": [s.id for s in studies], "split": [s.split for s in studies],
             "patient_id": [s.patient_id for s in studies], "report": [s.report for s in studies],
             "findings": [s.findings for s in studies], "impression": [s.impression for s in studies],
             "n_images": [n_images[s.id] for s in studies]}
    table.update({col: pa.array(labels[:, j], pa.float32()) for j, col in enumerate(LABEL_COLUMNS)})
    table.update({col: pa.array(targets[:, j], pa.float32()) for j, col in enumerate(TARGET_COLUMNS)})
    write_parquet(layout.studies, table)

    split_arr = np.array([s.split for s in studies])
    images_per_split = {sp: img_splits.count(sp) for sp in SPLITS}
    checks = check_dataset(p, studies, skips, n_images=images_per_split)
    stats = {
        PHANTOM_FLAG: phantom,
        "note": PHANTOM_NOTE if phantom else f"images decoded from {p.image_root}",
        "dataset": p.dataset,
        "report_cleaner": p.report_cleaner,
        "sections": p.sections,
        "labels": {"labeler": params.labels.labeler, "classifier_targets": params.labels.source},
        "studies": {sp: int((split_arr == sp).sum()) for sp in SPLITS},
        "images": images_per_split,
        "skipped": len(skips),
        "skipped_by_reason": dict(Counter(s.reason for s in skips)),
        "checks": checks,
        "skips": [s.as_dict() for s in skips],
        "label_positive_train": {n: int((targets[split_arr == "train", j] == 1).sum()) for j, n in enumerate(CHEXPERT_14)},
    }
    write_json(layout.stats, stats)
    seconds = timer()
    write_json(out / "timing.json", {"seconds": seconds, "images": len(refs),
                                     "images_per_s": round(len(refs) / max(seconds, 1e-9), 1),
                                     "decode_seconds": decode_seconds,  # the pool's decoding + the store's assembly
                                     "decode_images_per_s": round(len(refs) / max(decode_seconds, 1e-9), 1),
                                     "pool_seconds": pool_seconds,  # the pool's decoding alone (chunk files written)
                                     "pool_images_per_s": round(len(refs) / max(pool_seconds, 1e-9), 1)})
    write_resolved(out, data=p, labels=params.labels, runtime=params.runtime)
    log_checks(checks, log)
    log.info("studies %s, images %s, skipped %d (%s)%s", stats["studies"], stats["images"], len(skips),
             stats["skipped_by_reason"], " [PHANTOM images]" if phantom else "")


if __name__ == "__main__":
    main()
