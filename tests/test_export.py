"""amrg.export: a tiny predictions.parquet (the evaluate stage's columns) exported to RadEval's and
ReXrank's formats, read back the way those projects read them (RadEval ``docs/file_formats.md``;
ReXrank ``example_files/prediction.json`` and the ``split_json`` of ``example_files/evaluation_script.md``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IDS = ["CXR1_IM-0001", "CXR2_IM-0002", "CXR3_IM-0003"]
REFS = ["the heart is normal . the lungs are clear .", "mild cardiomegaly .", "no pneumothorax ."]
GEN = ["the heart is normal .", "the heart is enlarged .", ""]
MOST_FREQUENT = ["the lungs are clear ."] * 3
NEAREST = ["heart size normal .", "cardiomegaly .", None]  # a null text reads as ""
# the fields of one study in ReXrank's IU X-ray test-set file (data/READMD.md, data/iu_xray/ReXRank_IUXray_test.json)
REXRANK_FIELDS = {"key_image_path", "image_path", "report", "section_findings", "section_impression", "split",
                  "frontal_lateral", "context"}


@pytest.fixture
def predictions(tmp_path) -> Path:
    from amrg.io import write_parquet

    path = tmp_path / "eval" / "predictions.parquet"
    write_parquet(path, {"id": IDS, "reference": REFS, "generated": GEN, "baseline_most_frequent": MOST_FREQUENT,
                         "baseline_nearest_neighbour": NEAREST})
    return path


def _rexrank_dataset(tmp_path: Path, ids: list[str]) -> Path:
    data = {i: {"key_image_path": f"{i}/0.png", "image_path": [f"{i}/0.png", f"{i}/1.png"],
                "report": f"Findings: Raw findings {n}. Impression: Raw impression {n}.",
                "section_findings": f"Raw findings {n}.", "section_impression": f"Raw impression {n}.",
                "split": "test", "frontal_lateral": ["Frontal", "Lateral"], "context": "Indication: test."}
            for n, i in enumerate(ids)}
    path = tmp_path / "ReXRank_test.json"
    path.write_text(json.dumps(data))
    return path


def _split_json(path: Path) -> tuple[list[list[str]], list[list[str]]]:
    """ReXrank's split_json (evaluation_script.md) without pandas: [study_id, report] rows of the
    ground truth and of the predictions."""
    gt, predicted = [], []
    for study_id, entry in json.loads(path.read_text()).items():
        predicted.append([study_id, entry["model_prediction"]])
        gt.append([study_id, f"Findings: {entry['section_findings']} Impression: {entry['section_impression']}"])
    return gt, predicted


def test_radeval_json(predictions, tmp_path):
    from amrg.export import export_radeval

    out = tmp_path / "radeval.json"
    summary = export_radeval(predictions, out)
    assert summary == {"format": "radeval", "layout": "json", "system": "model", "studies": 3, "out": str(out)}
    data = json.loads(out.read_text())
    # RadEval's documented loader: refs = data["references"]; hyps = data["hypotheses"] -- lists of str, equal length
    refs, hyps = data["references"], data["hypotheses"]
    assert refs == REFS and hyps == GEN and all(isinstance(t, str) for t in refs + hyps)
    assert data["ids"] == IDS
    # compare_systems: {name: reports}, the baselines first (RadEval tests the others against the first)
    assert list(data["systems"]) == ["most_frequent", "nearest_neighbour", "model"]
    assert data["systems"]["nearest_neighbour"] == ["heart size normal .", "cardiomegaly .", ""]
    assert data["systems"]["model"] == GEN
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval", "radeval.json"]  # atomic: no temp file left

    export_radeval(predictions, out, system="most_frequent")
    assert json.loads(out.read_text())["hypotheses"] == MOST_FREQUENT


def test_radeval_jsonl(predictions, tmp_path):
    from amrg.export import export_radeval

    out = tmp_path / "radeval.jsonl"
    assert export_radeval(predictions, out, system="nearest_neighbour")["layout"] == "jsonl"
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    # RadEval's JSONL loader: refs = [r["ref"] for r in rows]; hyps = [r["hyp"] for r in rows]
    assert [r["ref"] for r in rows] == REFS and [r["hyp"] for r in rows] == ["heart size normal .", "cardiomegaly .", ""]
    assert [r["id"] for r in rows] == IDS and all(set(r) == {"id", "ref", "hyp"} for r in rows)


def test_rexrank_without_dataset(predictions, tmp_path):
    from amrg.export import export_rexrank

    out = tmp_path / "rexrank.json"
    assert export_rexrank(predictions, out)["studies"] == 3
    data = json.loads(out.read_text())
    assert list(data) == IDS  # keyed by study id, in test order
    assert data[IDS[1]] == {"section_findings": REFS[1], "section_impression": None, "split": "test",
                            "model_prediction": GEN[1]}
    gt, predicted = _split_json(out)
    assert predicted == [[i, g] for i, g in zip(IDS, GEN)]
    assert gt[0] == [IDS[0], f"Findings: {REFS[0]} Impression: None"]  # what ReXrank's script makes of it


def test_rexrank_with_dataset(predictions, tmp_path):
    from amrg.export import ExportError, export_rexrank

    dataset = _rexrank_dataset(tmp_path, [*IDS, "CXR9_IM-0009"])  # one ReXrank study amrg did not predict
    out = tmp_path / "rexrank.json"
    summary = export_rexrank(predictions, out, system="model", dataset=dataset)
    assert (summary["dataset_studies"], summary["dataset_without_prediction"], summary["studies"]) == (4, 1, 3)
    data = json.loads(out.read_text())
    source = json.loads(dataset.read_text())
    assert list(data) == IDS
    for i, g in zip(IDS, GEN):  # ReXrank's entry kept as it is, plus model_prediction
        assert set(data[i]) == REXRANK_FIELDS | {"model_prediction"}
        assert {k: v for k, v in data[i].items() if k != "model_prediction"} == source[i]
        assert data[i]["model_prediction"] == g
    gt, _ = _split_json(out)
    assert gt[2] == [IDS[2], "Findings: Raw findings 2. Impression: Raw impression 2."]  # ReXrank's references

    with pytest.raises(ExportError, match=r"1 predicted study id\(s\) not in"):
        export_rexrank(predictions, out, dataset=_rexrank_dataset(tmp_path, IDS[:2]))
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ExportError, match="expected ReXrank's test-set JSON"):
        export_rexrank(predictions, out, dataset=tmp_path / "bad.json")


def test_errors(predictions, tmp_path):
    from amrg.export import ExportError, export_radeval, export_rexrank
    from amrg.io import write_parquet

    with pytest.raises(ExportError, match=r"no system 'oracle_template'; it has \['model', 'most_frequent', 'nearest_neighbour'\]"):
        export_radeval(predictions, tmp_path / "x.json", system="oracle_template")
    bad = tmp_path / "bad.parquet"
    write_parquet(bad, {"id": IDS, "text": REFS})
    with pytest.raises(ExportError, match=r"no column\(s\) \['reference', 'generated'\]"):
        export_rexrank(bad, tmp_path / "x.json")
    with pytest.raises(ExportError, match="missing.parquet"):
        export_radeval(tmp_path / "missing.parquet", tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


def test_cli(predictions, tmp_path, capsys):
    from amrg.export import main

    out = tmp_path / "r.json"
    assert main(["--format", "rexrank", "--predictions", str(predictions), "--out", str(out),
                 "--system", "most_frequent"]) == 0
    assert json.loads(capsys.readouterr().out)["system"] == "most_frequent"
    assert json.loads(out.read_text())[IDS[0]]["model_prediction"] == MOST_FREQUENT[0]
    assert main(["--format", "radeval", "--predictions", str(predictions), "--out", str(out), "--system", "nope"]) == 1
    assert "no system 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--format", "radeval", "--predictions", str(predictions), "--out", str(out), "--dataset", "x.json"])
    # the module entry point, as the README runs it
    p = subprocess.run([sys.executable, "-m", "amrg.export", "--format", "radeval", "--predictions", str(predictions),
                        "--out", str(tmp_path / "cli.jsonl")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == {"format": "radeval", "layout": "jsonl", "system": "model", "studies": 3,
                                    "out": str(tmp_path / "cli.jsonl")}
    assert len((tmp_path / "cli.jsonl").read_text().splitlines()) == 3
