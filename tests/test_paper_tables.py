"""sweeps/paper_tables.yaml: Tables IV-X with the paper's grids, reporting the paper's columns (BLEU-4, ROUGE-L,
METEOR, CIDEr, CE P/R/F1), every point a valid overlay of the embedded default and of the paper profiles.
Params validation only: no model named by a point (7B LLMs on the hub) is built or downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest

from amrg.profiles import materialise, render
from flows.sweep import load_grid, validate_points

ROOT = Path(__file__).resolve().parents[1]
GRID = load_grid(ROOT / "sweeps" / "paper_tables.yaml")

# the paper's grids (AM-MRG, Tables V-X), in the paper's order
PAPER = {
    "table_v": ("cam.max_per_disease", [100, 250, 500, 750, 1000]),
    "table_vi": ("banks.report.size", [500, 1000, 3000, 6000, 8000, 10000]),
    "table_vii": ("hopfield.beta", [0.5, 1, 2, 4, 8, 16]),
    "table_viii": ("banks.report.encoder", ["meta-llama/Llama-2-7b-hf", "lmsys/vicuna-7b-v1.5", "microsoft/Orca-2-7b",
                                            "internlm/internlm-7b", "emilyalsentzer/Bio_ClinicalBERT"]),
    "table_ix": ("cam.method", ["hirescam", "xgradcam", "eigencam", "gradcam++", "gradcam"]),
    "table_x": ("llm.name", ["gpt2-medium", "internlm/internlm-7b", "01-ai/Yi-1.5-9B", "microsoft/Orca-2-7b",
                             "lmsys/vicuna-7b-v1.5", "meta-llama/Llama-2-7b-hf"]),
}


def test_tables_iv_to_x_use_the_papers_grids():
    assert list(GRID.tables) == ["table_iv", *PAPER]
    assert [(p["hopfield.visual"], p["hopfield.report"]) for p in GRID.tables["table_iv"]] == [
        (False, False), (True, False), (False, True), (True, True)]
    for table, (key, values) in PAPER.items():
        assert [p[key] for p in GRID.tables[table]] == values, table
    for p in GRID.tables["table_x"]:  # a frozen pretrained LM, InternLM with its own code
        assert (p["llm.source"], p["llm.trainable"]) == ("pretrained", "none")
        assert p.get("llm.trust_remote_code", False) == ("internlm" in p["llm.name"])
    for p in GRID.tables["table_viii"]:
        assert p.get("banks.report.trust_remote_code", False) == ("internlm" in p["banks.report.encoder"])
        assert p["banks.report.pooling"] == ("mean" if "BERT" in p["banks.report.encoder"] else "last")


def test_every_table_reports_the_papers_columns():
    assert GRID.metrics == {"BLEU-4": "model.BLEU_4", "ROUGE-L": "model.ROUGE_L", "METEOR": "model.METEOR",
                            "CIDEr": "model.CIDEr", "CE P": "model.ce.precision", "CE R": "model.ce.recall",
                            "CE F1": "model.ce.f1", "Sum (regions)": "artifacts/cam/metrics.json:regions"}


@pytest.mark.parametrize("profile", [None, "paper-mimic", "paper-iu", "paper-chexpert-plus"])
def test_every_point_is_a_valid_overlay(tmp_path, profile):
    """Against the embedded default, and against each paper profile written as params.yaml (as the sweep's
    header says to run it): every key exists there and every merged point passes parse_params."""
    params = ROOT / "params.yaml"
    if profile is not None:
        raw, _ = materialise(ROOT / "configs" / f"{profile}.yaml", params)
        params = tmp_path / "params.yaml"
        params.write_text(render(ROOT / "configs" / f"{profile}.yaml", raw, ROOT / "params.yaml"))
    validate_points(GRID, params)  # SweepConfigError naming every bad point
