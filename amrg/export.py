"""The evaluate stage's predictions in the input formats of other scorers, to cross-check amrg's numbers.

    python -m amrg.export --format radeval --predictions artifacts/eval/predictions.parquet --out radeval.json
    python -m amrg.export --format radeval --predictions artifacts/eval/predictions.parquet --out radeval.jsonl
    python -m amrg.export --format rexrank --predictions artifacts/eval/predictions.parquet --out rexrank.json \\
        [--system model] [--dataset ReXRank_IUXray_test.json]

Input: ``predictions.parquet`` of the evaluate stage, one row per test study, columns ``id``,
``reference``, ``generated`` and ``baseline_<name>`` (``most_frequent``, ``nearest_neighbour``,
``oracle_template``). The texts are exported exactly as amrg scored them: the references after the
report cleaner (R2Gen ``clean_report_iu``: lower case, punctuation as tokens) and, when
``evaluate.reference_max_tokens`` is set, truncated; the reports as generated. ``system`` picks the
hypotheses: ``model`` (the ``generated`` column) or a baseline name. Files are written atomically
(:func:`amrg.io.write_json` / :func:`amrg.io.write_text`).

RadEval (github.com/jbdel/RadEval, read at commit e0a39097e778)
----------------------------------------------------------------
``RadEval(metrics=[...])(refs=..., hyps=...)`` takes two Python lists of strings of equal length
(``radeval/radeval.py``, ``RadEval.__call__``); ``docs/file_formats.md`` documents the files it loads
them from. Verified there and written here:

* ``.json`` (section "JSON"): ``{"references": [...], "hypotheses": [...]}``, loaded as
  ``refs = data["references"]; hyps = data["hypotheses"]``. This file adds two keys the documented
  loader ignores: ``ids`` (study ids, in the same order) and ``systems`` (``{name: [reports]}``, the
  baselines first and ``model`` last) for ``radeval.compare_systems(systems=data["systems"], ...,
  references=data["references"])`` (README "Comparing systems", ``docs/hypothesis_testing.md``: the
  first system is the one the others are tested against).
* ``.jsonl`` (section "JSONL"): one ``{"ref": ..., "hyp": ...}`` object per line (plus ``"id"``).

ReXrank (github.com/rajpurkarlab/ReXrank, read at commit 8152f99919e4)
-----------------------------------------------------------------------
A submission's predictions file is one JSON object keyed by study id; each value is that study's
entry of the test-set file (``data/iu_xray/ReXRank_IUXray_test.json`` and its MIMIC-CXR / CheXpert Plus
siblings; fields in ``data/READMD.md``) with the model's report added as ``"model_prediction"``
(``example_files/prediction.json``; ``example_files/merversa_inference.py`` writes
``save_data_dict[study_id] = {**entry, "model_prediction": text}``). ReXrank's scoring script
(``example_files/evaluation_script.md``, ``split_json``) reads ``model_prediction``,
``section_findings`` and ``section_impression`` of each entry and scores against
``f"Findings: {section_findings} Impression: {section_impression}"``.

* With ``dataset`` (a ReXrank test-set file): every exported study keeps its ReXrank entry (images,
  context, ReXrank's own raw findings and impression) plus ``model_prediction``. amrg's IU X-ray test
  ids (the R2Gen split) are exactly the 590 keys of ``ReXRank_IUXray_test.json``. A predicted id that
  the file lacks is an error; the file's studies without a prediction (a ``data.max_studies`` run) are
  left out and counted.
* Without ``dataset``: ``{id: {"section_findings": reference, "section_impression": null,
  "split": "test", "model_prediction": report}}``, the fields ``split_json`` reads, with amrg's
  reference as the findings (amrg scores FINDINGS only). Image paths and context are not in
  predictions.parquet and are left out.

Not verified: how ReXrank scores its findings-only column. The published ``split_json`` always
appends ``Impression: {section_impression}`` (``Impression: None`` for a null impression); the
leaderboard's scoring code (rajpurkarlab/ReXrank-metric) could not be read here. The submission
tutorials (``example_files/submission_tutorial*.md``) ask for a model and an inference script, not a
predictions file, so this export is for running ReXrank's metrics yourself, not a submission.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .io import read_parquet, write_json, write_text
from .layout import Layout

FORMATS = ("radeval", "rexrank")
MODEL = "model"
BASELINE_PREFIX = "baseline_"


class ExportError(ValueError):
    """The predictions file or the options do not allow the export."""


def read_predictions(predictions_parquet: str | Path) -> dict[str, list[str]]:
    """``{"id": [...], "reference": [...], "model": [...], <baseline>: [...]}`` from predictions.parquet
    (``generated`` as ``model``, ``baseline_<name>`` as ``<name>``); a null text reads as ``""``."""
    try:
        table = read_parquet(predictions_parquet)
    except (OSError, ValueError) as exc:
        raise ExportError(f"{predictions_parquet}: {exc}") from exc
    cols = table.column_names
    if missing := [c for c in ("id", "reference", "generated") if c not in cols]:
        raise ExportError(f"{predictions_parquet}: no column(s) {missing} (has {cols}); "
                          "expected the evaluate stage's predictions.parquet")

    def texts(col: str) -> list[str]:
        return ["" if v is None else str(v) for v in table.column(col).to_pylist()]

    out = {"id": texts("id"), "reference": texts("reference"), MODEL: texts("generated")}
    out.update({c[len(BASELINE_PREFIX):]: texts(c) for c in cols if c.startswith(BASELINE_PREFIX)})
    if len(set(out["id"])) != len(out["id"]):
        raise ExportError(f"{predictions_parquet}: repeated study ids")
    return out


def systems_of(pred: dict[str, list[str]]) -> list[str]:
    """``model`` and the baselines of a :func:`read_predictions` result, in file order."""
    return [k for k in pred if k not in ("id", "reference")]


def _hyps(pred: dict[str, list[str]], system: str, source: str | Path) -> list[str]:
    if system not in systems_of(pred):
        raise ExportError(f"{source}: no system {system!r}; it has {systems_of(pred)}")
    return pred[system]


def export_radeval(predictions_parquet: str | Path, out_path: str | Path, system: str = MODEL) -> dict[str, Any]:
    """RadEval's input (``docs/file_formats.md`` of jbdel/RadEval): ``.jsonl`` -> one
    ``{"id", "ref", "hyp"}`` per line; any other suffix -> ``{"references", "hypotheses", "ids",
    "systems"}`` JSON (the last two are additions the documented loader ignores). Returns a summary."""
    pred = read_predictions(predictions_parquet)
    hyps = _hyps(pred, system, predictions_parquet)
    out = Path(out_path)
    if out.suffix.lower() == ".jsonl":
        write_text(out, "".join(json.dumps({"id": i, "ref": r, "hyp": h}) + "\n"
                                for i, r, h in zip(pred["id"], pred["reference"], hyps)))
        layout = "jsonl"
    else:
        others = [s for s in systems_of(pred) if s != MODEL]
        write_json(out, {"references": pred["reference"], "hypotheses": hyps, "ids": pred["id"],
                         "systems": {s: pred[s] for s in [*others, MODEL]}})
        layout = "json"
    return {"format": "radeval", "layout": layout, "system": system, "studies": len(hyps), "out": str(out)}


def export_rexrank(predictions_parquet: str | Path, out_path: str | Path, system: str = MODEL,
                   dataset: str | Path | None = None) -> dict[str, Any]:
    """ReXrank's predictions JSON (``example_files/prediction.json`` of rajpurkarlab/ReXrank):
    ``{study_id: {...entry, "model_prediction": report}}``, the entries taken from the ReXrank test-set
    file ``dataset`` when given, else the fields ReXrank's ``split_json`` reads. Returns a summary."""
    pred = read_predictions(predictions_parquet)
    hyps = _hyps(pred, system, predictions_parquet)
    summary: dict[str, Any] = {"format": "rexrank", "system": system, "studies": len(hyps), "out": str(out_path)}
    if dataset is None:
        entries = {i: {"section_findings": r, "section_impression": None, "split": "test", "model_prediction": h}
                   for i, r, h in zip(pred["id"], pred["reference"], hyps)}
    else:
        try:
            data = json.loads(Path(dataset).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ExportError(f"dataset {dataset}: {exc}") from exc
        if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
            raise ExportError(f"dataset {dataset}: expected ReXrank's test-set JSON ({{study_id: {{...}}}})")
        if unknown := [i for i in pred["id"] if i not in data]:
            raise ExportError(f"{len(unknown)} predicted study id(s) not in {dataset}, e.g. {unknown[:3]}: "
                              "is it the test set of the dataset amrg evaluated?")
        entries = {i: {**data[i], "model_prediction": h} for i, h in zip(pred["id"], hyps)}
        summary.update(dataset=str(dataset), dataset_studies=len(data), dataset_without_prediction=len(data) - len(entries))
    write_json(out_path, entries)
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m amrg.export", description=__doc__.splitlines()[0])
    ap.add_argument("--format", required=True, choices=FORMATS)
    ap.add_argument("--predictions", default=str(Layout().predictions),
                    help="the evaluate stage's predictions.parquet (default: %(default)s)")
    ap.add_argument("--out", required=True, help="output file (radeval: .json, or .jsonl for one object a line)")
    ap.add_argument("--system", default=MODEL, help="hypotheses: model (default) or a baseline name")
    ap.add_argument("--dataset", default=None, help="rexrank: ReXrank's test-set JSON, whose entries are kept")
    args = ap.parse_args(argv)
    try:
        if args.format == "radeval":
            if args.dataset:
                ap.error("--dataset is for --format rexrank")
            summary = export_radeval(args.predictions, args.out, args.system)
        else:
            summary = export_rexrank(args.predictions, args.out, args.system, args.dataset)
    except ExportError as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
