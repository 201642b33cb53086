"""End to end on MIMIC-CXR's published layout: `dvc repro evaluate` on a tiny MIMIC-CXR-JPG tree with its
reports zip, real (fixture) JPEGs decoded, dataset labels as the classifier's targets; then the
manifest's promises: touching nothing reruns nothing, changing one image reruns preprocess."""

import json
import os
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ._fixtures_mimic import make_mimic_tree
from ._workspace import make_workspace, run, stages_ran

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]



def test_dvc_repro_on_a_mimic_cxr_tree(tmp_path):
    tree = make_mimic_tree(tmp_path / "mimic", zip_reports=True)
    overlay = {"data": {"dataset": "mimic_cxr", "root": str(tree["root"]), "reports": str(tree["reports"]),
                        "annotation": None, "images": "files", "max_studies": None, "chunk_images": 16},
               "labels": {"source": "dataset"},
               "evaluate": {"bootstrap": 20, "report_samples": 2, "meteor": False}}
    ws = make_workspace(tmp_path / "ws", overlay)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", CUDA_VISIBLE_DEVICES="")
    dvc = [sys.executable, "-m", "dvc"]
    first = run(dvc + ["repro", "evaluate"], ws, env)
    assert stages_ran(first)[:2] == ["index", "preprocess"] and "evaluate" in stages_ran(first)

    stats = json.loads((ws / "artifacts/preprocess/stats.json").read_text())
    assert stats["phantom_images"] is False and stats["dataset"] == "mimic_cxr"
    # the fixture's buildable studies, less the one without dataset labels (labels.source: dataset)
    assert stats["studies"] == {"train": 18, "val": 5, "test": 5}
    assert stats["labels"]["classifier_targets"] == "dataset"
    expected = {(sid, reason) for sid, reason in tree["skips"].items()}  # every breaking case, counted
    expected |= {(tree["cases"]["no_labels"], "no_dataset_labels"),
                 (tree["cases"]["missing_image"], "missing_image")}
    assert expected <= {(s["id"], s["reason"]) for s in stats["skips"]}
    assert stats["checks"]["patients_in_several_splits"]["count"] >= 1
    studies = pq.read_table(ws / "artifacts/preprocess/studies.parquet").to_pydict()
    some = next(i for i, s in enumerate(studies["id"]) if tree["labels"].get(s) is not None)
    from amrg.labels.schema import TARGET_COLUMNS
    targets = [studies[c][some] for c in TARGET_COLUMNS]
    assert all((a == b) or (a != a and b != b) for a, b in zip(targets, tree["labels"][studies["id"][some]]))
    metrics = json.loads((ws / "artifacts/eval/metrics.json").read_text())
    assert metrics["phantom_images"] is False and metrics["n_test"] == 5

    # touching nothing reruns nothing (the index stage runs, its manifest comes out the same)
    assert stages_ran(run(dvc + ["repro", "evaluate"], ws, env)) == ["index"]
    # one image rewritten: the manifest changes, preprocess is due again
    jpg = next(Path(tree["root"], "files").rglob("*.jpg"))
    jpg.write_bytes(jpg.read_bytes() + b"\0")
    run(dvc + ["repro", "index"], ws, env)
    status = run(dvc + ["status", "preprocess"], ws, env)
    assert "artifacts/index" in status and "modified" in status
