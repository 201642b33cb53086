"""The CXPMRG-Bench sweep (seed 002 Tables 1-2): ``sweeps/cxpmrg_bench.yaml`` loads and every point (also
the commented hub points) is a valid overlay of the params; per-point ``label`` never reaches ``-S``; the
``--dry-run`` commands; the ``format: cxpmrg`` table from a canned ``dvc exp show --json`` (exact cells,
``—`` for a metric a run did not write); the published rows of ``bench/cxpmrg_published.csv`` only in their
own block, under their protocol, with the paper's numbers. No DVC, no Prefect run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "sweeps" / "cxpmrg_bench.yaml"
PUBLISHED = ROOT / "bench" / "cxpmrg_published.csv"


def _params_file(tmp_path: Path) -> Path:
    """params.yaml over amrg.config's defaults: the sections the lead has not added to params.yaml yet
    (generator_vision, pretrain_*, generator.query_tokens) take their typed defaults; once params.yaml has
    them this equals params.yaml."""
    from amrg.config import Params, merge_overlay, to_dict

    merged = merge_overlay(to_dict(Params()), yaml.safe_load((ROOT / "params.yaml").read_text()))
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(merged, sort_keys=False))
    return path


def _grid(tmp_path: Path, doc: dict | str) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False))
    return path


def test_bench_grid_loads_and_validates(tmp_path):
    from flows.sweep import CXPMRG, CXPMRG_METRICS, SweepConfigError, load_grid, validate_points

    g = load_grid(BENCH)
    assert (g.name, g.format, g.reference) == ("cxpmrg", CXPMRG, "bench/cxpmrg_published.csv")
    assert g.metrics == CXPMRG_METRICS  # the yaml writes the format's columns out, unchanged
    assert {t: len(p) for t, p in g.tables.items()} == {"table_1": 4, "table_2": 3}
    assert all("label" not in point for _, _, point in g.experiments())  # labels are not params
    labels = g.experiment_labels()
    assert labels["cxpmrg-table-1-02"] == "AM-MRG (amrg, params.yaml)" and len(labels) == 7
    assert g.tables["table_1"][1] == {}  # AM-MRG: params.yaml as it is, no -S
    mamba = g.tables["table_1"][2]
    assert (mamba["generator_vision.source"], mamba["generator_vision.trainable"], mamba["pretrain_vision.objective"],
            mamba["pretrain_contrastive.enabled"], mamba["generator.query_tokens"]) == ("pretrained", True, "arm", True, False)
    assert {k: v for k, v in g.tables["table_1"][3].items() if k.startswith(("hopfield", "generator."))} == {
        "hopfield.visual": True, "hopfield.report": True, "generator.query_tokens": True}
    # its pre-training sizes are configs/mambaxray-tiny.yaml's (the CPU-sized chain), key for key
    from flows.dvc_tasks import overlay_leaves

    tiny = overlay_leaves(yaml.safe_load((ROOT / "configs" / "mambaxray-tiny.yaml").read_text()))
    assert {k: v for k, v in mamba.items() if k.startswith("pretrain_")} == {
        k: v for k, v in tiny.items() if k.startswith("pretrain_")}
    assert {k: v for k, v in g.tables["table_1"][3].items() if k.startswith("pretrain_")} == {
        k: v for k, v in tiny.items() if k.startswith("pretrain_")}
    params = _params_file(tmp_path)
    validate_points(g, params)
    if "generator_vision" in yaml.safe_load((ROOT / "params.yaml").read_text()):  # the lead's sections landed
        validate_points(g, ROOT / "params.yaml")
    # the commented hub points (the paper's frozen LLMs) are valid params too, once uncommented
    text = BENCH.read_text()
    hub = re.sub(r"^      # (- \{label: |   )", r"      \1", text, flags=re.M)
    hub_grid = load_grid(_grid(tmp_path, hub))
    assert len(hub_grid.tables["table_2"]) == 3 + 14
    validate_points(hub_grid, params)
    assert hub_grid.tables["table_2"][6]["llm.trust_remote_code"] is True  # InternLM
    assert all(p["llm.trainable"] == "none" for p in hub_grid.tables["table_2"][3:])
    # why the embedded default's rows train their LLM: a frozen scratch LM is refused by config.Llm.check
    frozen = load_grid(_grid(tmp_path, {"tables": {"t": {"points": [{"label": "x", "llm.trainable": "none"}]}}}))
    with pytest.raises(SweepConfigError, match="would train nothing in a random LM"):
        validate_points(frozen, params)


def test_label_and_format_rules(tmp_path):
    from flows.sweep import SweepConfigError, collect, load_grid, to_markdown

    for doc, msg in (
        ({"tables": {"t": {"set": {"label": "x"}, "points": [{"hopfield.beta": 1.0}]}}}, "give it in `points:`"),
        ({"tables": {"t": {"grid": {"label": ["a", "b"]}}}}, "give it in `points:`"),
        ({"tables": {"t": {"points": [{"label": 3}]}}}, "non-empty string"),
        ({"tables": {"t": {"points": [{"label": " "}]}}}, "non-empty string"),
        ({"format": "latex", "tables": {"t": {"points": [{}]}}}, "format 'latex' is not one of"),
        ({"format": "cxpmrg", "tables": {"t": {"seeds": [0, 1]}}}, "one row per point"),
        ({"format": "cxpmrg", "metrics": {"BLEU-5": "model.x"}, "tables": {"t": {"points": [{}]}}},
         r"unknown metric column\(s\) \['BLEU-5'\]"),
        ({"refrence": "x.csv", "tables": {"t": {"points": [{}]}}}, r"unknown fields \['refrence'\]"),
    ):
        with pytest.raises(SweepConfigError, match=msg):
            load_grid(_grid(tmp_path, doc))
    # a cxpmrg grid may override one column's spec; the others keep the format's
    g = load_grid(_grid(tmp_path, {"format": "cxpmrg", "metrics": {"Time (min)": "timing.minutes"},
                                   "tables": {"t": {"points": [{}]}}}))
    assert g.metrics["Time (min)"] == "timing.minutes" and g.metrics["BLEU-4"] == "model.BLEU_4"
    # the default format: a table with labelled points gets a label column, points without one stay blank
    g = load_grid(_grid(tmp_path, {"name": "toy", "metrics": {"score": "model.score"}, "tables": {
        "t": {"points": [{"label": "beta one", "hopfield.beta": 1.0}, {"hopfield.beta": 2.0}]}}}))
    assert g.experiments() == [("toy-t-01", "t", {"hopfield.beta": 1.0}), ("toy-t-02", "t", {"hopfield.beta": 2.0})]
    data = {"params": {"params.yaml": {"data": {"hopfield": {"beta": 1.0}}}},
            "metrics": {"artifacts/eval/metrics.json": {"data": {"model": {"score": 0.5}}}}}
    show = [{"rev": "workspace", "experiments": [{"name": "toy-t-01", "revs": [{"data": data}],
                                                  "executor": {"state": "success"}}]}]
    md = to_markdown(collect(show, g), g)
    assert "| experiment | label | state | hopfield.beta | score |" in md
    assert "| toy-t-01 | beta one | success | 1 | 0.5 |" in md and "| toy-t-02 |  | missing |  |  |" in md


def test_dry_run_prints_the_commands_without_labels(tmp_path, capsys):
    from flows.sweep import main

    repo = tmp_path / "repo"
    repo.mkdir()
    _params_file(repo)
    (repo / "bench").mkdir()
    (repo / "bench" / "cxpmrg_published.csv").write_text(PUBLISHED.read_text())
    assert main(["--grid", str(BENCH), "--repo", str(repo), "--dry-run", "--tables", "table_1"]) == 0
    out = capsys.readouterr().out.splitlines()
    off = "-S hopfield.visual=false -S hopfield.report=false -S generator.query_tokens=false"
    mamba = ("-S generator_vision.source=pretrained -S generator_vision.trainable=true "
             "-S pretrain_vision.objective=arm -S pretrain_contrastive.enabled=true")
    sizes = ("-S pretrain_vision.name=amrg_vim_tiny_pz16 -S pretrain_vision.image_size=64 -S pretrain_vision.cluster=2 -S pretrain_vision.decoder_dim=32 "
             "-S pretrain_vision.decoder_depth=1 -S pretrain_vision.decoder_heads=2 -S pretrain_vision.epochs=2 "
             "-S pretrain_vision.batch_size=8 -S pretrain_vision.warmup_epochs=0 -S pretrain_contrastive.proj_dim=32 "
             "-S pretrain_contrastive.max_length=32 -S pretrain_contrastive.image_size=64 "
             "-S pretrain_contrastive.epochs=2 -S pretrain_contrastive.batch_size=8")
    assert out == [
        f"dvc exp run --queue --name cxpmrg-table-1-01 {off}",
        "dvc exp run --queue --name cxpmrg-table-1-02",
        f"dvc exp run --queue --name cxpmrg-table-1-03 {mamba} {off} {sizes}",
        f"dvc exp run --queue --name cxpmrg-table-1-04 {mamba} -S hopfield.visual=true -S hopfield.report=true "
        f"-S generator.query_tokens=true {sizes}"]
    assert "label" not in "\n".join(out)
    # the dry run validates like the flow: a missing reference file stops it before any command
    (repo / "bench" / "cxpmrg_published.csv").unlink()
    with pytest.raises(SystemExit):
        main(["--grid", str(BENCH), "--repo", str(repo), "--dry-run"])
    assert "reference" in capsys.readouterr().err


REFERENCE = """\
table,index,system,venue,encoder,decoder,B1,B2,B3,B4,R,M,C,CE_P,CE_R,CE_F1,time_min,params,params_meaning,protocol
Table 1,#20,MambaXray-VL-B,Ours,MambaXray-VL,Llama2,,,,0.105,0.267,0.149,0.117,0.333,0.264,0.273,50.66,57.31,"trainable, M",proto one
Table 2,#09,GPT2-Medium,2019,Swin-Transformer,GPT2-Medium,,,,0.063,0.198,0.104,0.067,0.358,0.186,0.165,57.33,354M,LLM/VLM size,proto two
"""


def _show() -> list[dict]:
    """A canned ``dvc exp show --json``: experiment 01 wrote every metric, 02 ran before the generation and
    total-parameter fields existed, 03 is absent."""
    def exp(name, params, eval_metrics, gen_metrics):
        data = {"params": {"params.yaml": {"data": params}},
                "metrics": {"artifacts/eval/metrics.json": {"data": eval_metrics},
                            "artifacts/generator/metrics.json": {"data": gen_metrics}}}
        return {"name": name, "revs": [{"name": name, "data": data, "error": None}], "executor": {"state": "success"}}

    scores = {"BLEU_1": 0.31234, "BLEU_2": 0.2, "BLEU_3": 0.15, "BLEU_4": 0.1055, "ROUGE_L": 0.27, "METEOR": 0.149,
              "CIDEr": 0.1174, "ce": {"precision": 0.3333, "recall": 0.264, "f1": 0.2731}}
    swin = {"vision": {"name": "swin_tiny"}, "generator_vision": {"source": "classifier", "trainable": False},
            "llm": {"source": "scratch", "trainable": "full", "layers": 2, "hidden_size": 128},
            "hopfield": {"visual": False}}
    mamba = {"generator_vision": {"source": "pretrained", "trainable": True}, "hopfield": {"visual": True},
             "pretrain_vision": {"name": "amrg_vim_tiny_pz16", "objective": "arm"}, "pretrain_contrastive": {"enabled": True},
             "llm": {"source": "pretrained", "name": "meta-llama/Llama-2-7b-hf", "trainable": "none"}}
    return [{"rev": "workspace", "name": None, "data": {}, "experiments": [
        exp("b-t-01", swin, {"model": scores, "generation": {"minutes": 1.2345, "device": "cpu"},
                             "ci95": {"model": {"BLEU_4": {"lo": 0.09, "hi": 0.12}}}},
            {"trainable_parameters": 1_234_567, "total_parameters": 57_310_000}),
        exp("b-t-02", mamba, {"model": {**scores, "BLEU_1": None}, "generation": {"seconds": 74.1}},
            {"trainable_parameters": 2_000}),
    ]}]


def test_cxpmrg_table_cells(tmp_path):
    from flows.sweep import collect, load_grid, reference_rows, to_csv, to_markdown

    (tmp_path / "ref.csv").write_text(REFERENCE)
    g = load_grid(_grid(tmp_path, {"name": "b", "format": "cxpmrg", "reference": "ref.csv", "tables": {
        "t": {"title": "Generators", "points": [{"label": "R2GenGPT-style", "hopfield.visual": False},
                                                {"label": "MambaXray-VL + memories", "hopfield.visual": True},
                                                {"label": "never ran", "hopfield.beta": 2.0}]}}}))
    reference = reference_rows(g, tmp_path)  # relative to the repository
    rows = collect(_show(), g)
    assert [(r["experiment"], r["label"], r["state"]) for r in rows] == [
        ("b-t-01", "R2GenGPT-style", "success"), ("b-t-02", "MambaXray-VL + memories", "success"),
        ("b-t-03", "never ran", "missing")]
    assert rows[0]["encoder"] == "swin_tiny (classifier's), frozen" and rows[0]["decoder"] == "scratch Llama 2x128, trained"
    assert rows[1]["encoder"] == "amrg_vim_tiny_pz16 (ARM + CTL), trained"
    assert rows[1]["decoder"] == "meta-llama/Llama-2-7b-hf, frozen"
    md = to_markdown(rows, g, reference)
    measured, published = md.split("## Published, not rerun (`ref.csv`)")
    assert ("| # | System | Encoder | Decoder/LLM | BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 | ROUGE-L | METEOR | CIDEr | "
            "CE P | CE R | CE F1 | Time (min) | Trainable params | Total params | Device | Experiment | State |") in measured
    # scores to 3 decimals, minutes to 2, parameters in millions (the paper's units)
    assert ("| #01 | R2GenGPT-style | swin_tiny (classifier's), frozen | scratch Llama 2x128, trained | 0.312 | 0.200 | "
            "0.150 | 0.105 | 0.270 | 0.149 | 0.117 | 0.333 | 0.264 | 0.273 | 1.23 | 1.23M | 57.31M | cpu | b-t-01 | "
            "success |") in measured
    # what a run did not write prints "—" (BLEU-1 null, no generation.minutes/device, no total_parameters)
    assert ("| #02 | MambaXray-VL + memories | amrg_vim_tiny_pz16 (ARM + CTL), trained | meta-llama/Llama-2-7b-hf, "
            "frozen | — | 0.200 | 0.150 | 0.105 | 0.270 | 0.149 | 0.117 | 0.333 | 0.264 | 0.273 | — | 0.0020M | — | — | "
            "b-t-02 | success |") in measured
    assert "| #03 | never ran | — | — | " + " | ".join(["—"] * 14) + " | b-t-03 | missing |" in measured
    # the published rows: only in their block, each group under its protocol, the CSV's numbers as written
    for name in ("MambaXray-VL-B", "GPT2-Medium", "proto one", "proto two"):
        assert name not in measured and name in published
    assert published.index("### Table 1 (published)\n\nProtocol: proto one") < published.index("| #20 | MambaXray-VL-B")
    assert published.index("### Table 2 (published)\n\nProtocol: proto two") < published.index("| #09 | GPT2-Medium")
    assert ("| #20 | MambaXray-VL-B | Ours | MambaXray-VL | Llama2 |  |  |  | 0.105 | 0.267 | 0.149 | 0.117 | 0.333 | "
            "0.264 | 0.273 | 50.66 | 57.31 | trainable, M |") in published
    assert "| #09 | GPT2-Medium | 2019 | Swin-Transformer | GPT2-Medium |  |  |  | 0.063 |" in published
    assert "published" not in to_csv(rows)  # the CSV holds the measured rows only; raw counts, CIs kept
    assert "1234567" in to_csv(rows) and "BLEU-4 lo" in rows[0]
    # no reference: no published block
    assert "Published, not rerun" not in to_markdown(rows, g)


def test_reference_file_rules(tmp_path):
    from flows.sweep import REFERENCE_FIELDS, SweepConfigError, load_reference

    (tmp_path / "a.csv").write_text(REFERENCE.replace(",proto two", ","))
    with pytest.raises(SweepConfigError, match=r"line\(s\) \[3\] name no protocol"):
        load_reference(tmp_path / "a.csv")
    (tmp_path / "b.csv").write_text(REFERENCE.replace(",CE_F1,", ",F1,"))
    with pytest.raises(SweepConfigError, match=r"missing column\(s\) \['CE_F1'\]"):
        load_reference(tmp_path / "b.csv")
    with pytest.raises(SweepConfigError, match="reference"):
        load_reference(tmp_path / "none.csv")
    assert REFERENCE_FIELDS[:6] == ("table", "index", "system", "venue", "encoder", "decoder")


def test_published_numbers():
    """bench/cxpmrg_published.csv against seed 002's Tables 1 and 2, cells copied by hand from the paper."""
    from flows.sweep import load_reference

    rows = load_reference(PUBLISHED)
    t1 = [r for r in rows if r["table"] == "Table 1"]
    t2 = [r for r in rows if r["table"] == "Table 2"]
    assert [r["index"] for r in t1] == [f"#{i:02d}" for i in range(1, 22)] and len(t2) == 16 and len(rows) == 37
    cells = ("B4", "R", "M", "C", "CE_P", "CE_R", "CE_F1", "time_min", "params")
    by = {(r["table"], r["index"]): tuple(r[c] for c in cells) for r in rows}
    assert by[("Table 1", "#21")] == ("0.112", "0.276", "0.157", "0.139", "0.377", "0.319", "0.335", "55.18", "202.32")
    assert by[("Table 1", "#15")] == ("0.101", "0.266", "0.145", "0.123", "0.315", "0.244", "0.260", "77.8", "90.9")
    assert by[("Table 1", "#01")] == ("0.035", "0.186", "0.101", "0.012", "0.193", "0.229", "0.196", "44.33", "59.87")
    assert by[("Table 2", "#01")] == ("0.104", "0.272", "0.160", "0.202", "0.334", "0.258", "0.276", "72.00", "6.7B")
    assert by[("Table 2", "#09")] == ("0.063", "0.198", "0.104", "0.067", "0.358", "0.186", "0.165", "57.33", "354M")
    assert by[("Table 2", "#16")] == ("0.046", "0.177", "0.085", "0.076", "0.254", "0.152", "0.122", "51.50", "8.4B")
    assert all(r["B1"] == r["B2"] == r["B3"] == "" for r in rows)  # the tables report BLEU-4 only
    assert all(0 <= float(r[c]) <= 1 for r in rows for c in cells[:7])
    assert {r["params_meaning"] for r in t1} == {"trainable, M"} and {r["params_meaning"] for r in t2} == {"LLM/VLM size"}
    assert all("not rerun" in r["protocol"] and "cut to 100 LLM tokens" in r["protocol"] for r in rows)
