"""Checks on a built dataset: what preprocess stores under ``stats.json["checks"]`` and logs.

:func:`check_dataset` takes the builder's ``(studies, skips)`` (and, from preprocess, the images actually
decoded per split) and returns a JSON-serialisable dict:

- ``studies`` / ``images``: counts per split (``images_from``: ``decoded`` or ``image_paths``);
- ``published``: the split's published study counts (:data:`PUBLISHED_STUDIES`; image counts, under
  ``images``, for R2Gen's MIMIC-CXR file, which has one entry per image) and ``difference`` (built -
  published) per split; ``studies`` None with a ``note`` where none is confirmed; ``applies``
  False under ``data.max_studies`` (a smoke profile; still reported);
- ``patients_in_several_splits``: patient ids whose studies lie in more than one split (a leak), or
  ``"unknown (no patient ids)"`` (IU X-ray);
- ``reports_shared_train_test``: test studies whose cleaned report occurs verbatim among training
  reports (common on IU X-ray: "no acute cardiopulmonary abnormality"), with the fraction of test;
- ``without_section`` (skips ``no_*_section``), ``no_usable_view`` (``no_usable_view`` and
  ``no_readable_image``), ``skipped_by_reason`` (every skip reason).

Each problem is a ``count`` with at most ``examples`` example ids; :func:`log_checks` writes one WARNING
per non-zero problem and one INFO line of counts vs published. Everything is O(n) (sets and dicts).
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Optional

from amrg.config import Data
from amrg.data.schema import SPLITS, Skip, Study

UNKNOWN_PATIENTS = "unknown (no patient ids)"
PROBLEMS = ("patients_in_several_splits", "reports_shared_train_test", "without_section", "no_usable_view")
VIEW_REASONS = ("no_usable_view", "no_readable_image")

# Published study counts per split, keyed by (data.dataset, data.annotation is not None).
PUBLISHED_STUDIES: dict[tuple[str, bool], dict] = {
    # R2Gen's iu_xray/annotation.json (entries = studies): github.com/cuhksz-nlp/R2Gen/issues/16
    # (maintainer: "[2069, 296, 590] are the number of studies") and zhjohnchan/R2Gen/issues/1.
    ("iu_xray", True): {"split": "R2Gen IU X-ray", "studies": {"train": 2069, "val": 296, "test": 590}},
    # R2Gen's mimic_cxr/annotation.json has one entry per IMAGE (a study's frontal and lateral are two samples
    # sharing its report): WissingChen/CMCRL/issues/17; cuhksz-nlp/R2Gen/issues/1 ("train_image_num 270790";
    # maintainer: images without a report are left out), R2Gen/issues/16. So its counts are compared with
    # the images built, not the studies.
    ("mimic_cxr", True): {"split": "R2Gen MIMIC-CXR", "studies": None,
                          "images": {"train": 270790, "val": 2130, "test": 3858},
                          "note": "R2Gen's file counts images (one entry per image with a findings section), "
                                  "compared here with the images built (data.max_views per study, views other "
                                  "than PA/AP/LATERAL/LL dropped), so a difference is expected"},
    # The official MIMIC-CXR(-JPG 2.0.0) split, every study with a report: Chen et al. 2020 (R2Gen, EMNLP)
    # Table 1, "MIMIC-CXR's official split" (cited from the MIMIC-CXR paper, R2Gen issues/16); the sum
    # 227,835 is MIMIC-CXR's study total (mimic.mit.edu/docs/iv/modules/cxr). Images: 368,960/2,991/5,159.
    ("mimic_cxr", False): {"split": "MIMIC-CXR official", "studies": {"train": 222758, "val": 1808, "test": 3269},
                           "note": "all studies of the official split; builders keep only those with the chosen "
                                   "section(s) and a usable view, so fewer is expected"},
    # CXPMRG-Bench's re-split (Wang et al. 2024, arXiv:2410.00379), confirmed by its authors in
    # github.com/Event-AHU/Medical_Image_Analysis/issues/28 ("40463:5780:11562").
    ("chexpert_plus", True): {"split": "CXPMRG-Bench CheXpert Plus",
                              "studies": {"train": 40463, "val": 5780, "test": 11562}},
    # The release ships train / valid only (no test; alibaba-damo-academy/MedEvalKit/issues/8); no
    # published per-split study counts could be confirmed.
    ("chexpert_plus", False): {"split": "CheXpert Plus official", "studies": None,
                               "note": "no confirmed published per-split counts (the release has train/valid only)"},
}


def _by_split(values: dict[str, int]) -> dict[str, int]:
    return {s: int(values.get(s, 0)) for s in SPLITS}


def _published(data: Data, studies: dict[str, int], images: dict[str, int]) -> dict:
    entry = PUBLISHED_STUDIES.get((data.dataset, data.annotation is not None))
    if entry is None:
        return {"split": None, "studies": None, "difference": None, "applies": False,
                "note": f"no published counts for data.dataset={data.dataset}"}
    out = {"split": entry["split"], "studies": entry["studies"], "difference": None, "applies": True,
           "note": entry.get("note", "")}
    if entry["studies"] is not None:
        out["difference"] = {s: studies[s] - entry["studies"][s] for s in SPLITS}
    if "images" in entry:  # a split file that counts images (R2Gen's MIMIC-CXR)
        out["images"] = entry["images"]
        out["difference"] = {s: images[s] - entry["images"][s] for s in SPLITS}
    if data.max_studies is not None:
        out["applies"] = False
        out["note"] = f"data.max_studies={data.max_studies} (a smoke profile): the comparison does not apply"
    return out


def _skips(skips: list[Skip], keep, examples: int) -> dict:
    hit = [k for k in skips if keep(k.reason)]
    return {"count": len(hit), "by_reason": dict(Counter(k.reason for k in hit).most_common()),
            "examples": [k.id for k in hit[:examples]]}


def check_dataset(data: Data, studies: list[Study], skips: list[Skip], n_images: Optional[dict[str, int]] = None,
                  examples: int = 5) -> dict:
    """The checks of one build (see the module docstring); JSON-serialisable."""
    counts = _by_split(Counter(s.split for s in studies))
    paths: Counter = Counter()
    for s in studies:
        paths[s.split] += len(s.image_paths)
    images = _by_split(n_images if n_images is not None else paths)

    splits_of: dict[str, set[str]] = {}
    for s in studies:
        if s.patient_id:
            splits_of.setdefault(s.patient_id, set()).add(s.split)
    if splits_of:
        leaked = [p for p, sp in splits_of.items() if len(sp) > 1]
        patients = {"count": len(leaked), "patients_with_id": len(splits_of),
                    "examples": {p: [s for s in SPLITS if s in splits_of[p]] for p in leaked[:examples]}}
    else:
        patients = {"count": UNKNOWN_PATIENTS, "patients_with_id": 0, "examples": {}}

    train_reports = {s.report for s in studies if s.split == "train"}
    test = [s for s in studies if s.split == "test"]
    shared = [s.id for s in test if s.report in train_reports]
    reports = {"count": len(shared), "test_studies": len(test),
               "fraction": round(len(shared) / len(test), 4) if test else 0.0, "examples": shared[:examples]}

    return {
        "dataset": data.dataset, "sections": data.sections,
        "studies": counts, "images": images, "images_from": "image_paths" if n_images is None else "decoded",
        "published": _published(data, counts, images),
        "patients_in_several_splits": patients,
        "reports_shared_train_test": reports,
        "without_section": _skips(skips, lambda r: r.startswith("no_") and r.endswith("_section"), examples),
        "no_usable_view": _skips(skips, lambda r: r in VIEW_REASONS, examples),
        "skipped_by_reason": dict(Counter(k.reason for k in skips).most_common()),
    }


def log_checks(checks: dict, log: logging.Logger) -> None:
    """One WARNING per non-zero problem (its number and example ids), one INFO line of counts vs published."""
    for name in PROBLEMS:
        p = checks[name]
        if not isinstance(p["count"], int) or not p["count"]:
            continue
        extra = f" ({p['fraction']:.1%} of {p['test_studies']} test studies)" if "fraction" in p else ""
        extra += f" by reason {p['by_reason']}" if "by_reason" in p else ""
        log.warning("dataset check %s: %d%s; e.g. %s", name, p["count"], extra, p["examples"])
    pub = checks["published"]
    counted = "studies" if pub["studies"] is not None else "images" if pub.get("images") else None
    vs = (f"published {pub['split']} {counted} {pub[counted]}, difference {pub['difference']}"
          if counted else f"published: none ({pub['note']})")
    if counted and pub["note"]:
        vs += f" ({pub['note']})"
    log.info("dataset %s: studies %s, images (%s) %s; %s; patients in several splits: %s; skipped %s",
             checks["dataset"], checks["studies"], checks["images_from"], checks["images"], vs,
             checks["patients_in_several_splits"]["count"], sum(checks["skipped_by_reason"].values()))
