"""The score stage: model-based metrics from evaluate's predictions, their paired CIs and provenance."""

from __future__ import annotations

import json

import pytest
import yaml

from amrg.io import read_parquet, write_parquet
from amrg.layout import Layout

pytest.importorskip("bert_score", reason="needs the metrics extra: pip install -e '.[metrics]'")

REFS = ["the heart is normal in size .", "there is a small left pleural effusion .", "the lungs are clear .",
        "no pneumothorax .", "mild cardiomegaly .", "the lungs are clear . no effusion ."]
GEN = ["the heart is normal .", "small effusion on the left .", "the lungs are clear .", "no pneumothorax .",
       "the heart is enlarged .", "clear lungs ."]


def test_score_stage_bertscore_cis_and_skipped_radgraph(tmp_path):
    from amrg.metrics.bertscore import bertscore_scores
    from stages import score

    layout = Layout(tmp_path / "artifacts")
    write_parquet(layout.predictions, {"id": [f"s{i}" for i in range(6)], "reference": REFS, "generated": GEN,
                                       "baseline_most_frequent": [REFS[2]] * 6, "baseline_copy": REFS})
    params = yaml.safe_load(open("params.yaml"))
    params["evaluate"]["bootstrap"] = 50
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    score.main(["--params", str(tmp_path / "params.yaml"), "--artifacts", str(layout.root)])

    m = json.loads((layout.stage_dir("score") / "metrics.json").read_text())
    p = params["score"]
    direct = bertscore_scores(REFS, GEN, p["bertscore_model"], p["bertscore_layer"])
    assert m["bertscore"]["model"]["f1"] == pytest.approx(direct["f1"], abs=1e-6)
    assert m["bertscore"]["copy"]["f1"] == pytest.approx(1.0, abs=1e-5)  # a reference scores 1 against itself
    ci = m["bertscore"]["ci95"]["model"]["f1"]
    assert ci["lo"] <= m["bertscore"]["model"]["f1"] <= ci["hi"]
    assert m["bertscore"]["paired"]["copy"]["f1"]["hi"] < 0  # the model is below the references themselves
    assert m["bertscore"]["provenance"]["comparable"] is False  # the shipped MiniLM: not a published setting
    assert m["radgraph"] == {"skipped": "set score.radgraph_model (a local RadGraph model directory)"}
    per = read_parquet(layout.stage_dir("score") / "per_study.parquet").to_pydict()
    assert per["id"] == [f"s{i}" for i in range(6)]
    assert per["bertscore.model.f1"] == pytest.approx(direct["per_study"]["f1"], abs=1e-6)
