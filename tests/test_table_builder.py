"""The table builder (amrg.data.table): the module docstring's CSV example, its parquet twin, the report
columns, and every counted skip and clear error, against hand-written expectations."""

from __future__ import annotations

import csv
import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import amrg.data.table as table
from amrg.config import Data
from amrg.data.table import build, join_sections, outside_root

HEADER = "id,split,patient_id,findings,impression,images,views"
EXPECTED = {  # the docstring example, findings cleaned by hand (mimic cleaner)
    "s001": ("train", "p01", "the heart is normal in size . the lungs are clear .", ["s001/pa.png", "s001/lat.png"],
             ["PA", "LATERAL"]),
    "s002": ("train", "p02", "mild cardiomegaly . no pleural effusion .", ["s002/ap.png"], ["AP"]),
    "s003": ("val", "p03", "small left pleural effusion . no pneumothorax .", ["s003/pa.png", "s003/lat.png"],
             ["PA", "LATERAL"]),
    "s004": ("test", "p04", "the lungs are clear . no focal consolidation .", ["s004/pa.png"], ["PA"]),
}


def _example() -> str:
    """The five-line CSV example of the module docstring (the README quotes it)."""
    lines = [ln.strip() for ln in table.__doc__.splitlines()]
    start = lines.index(HEADER)
    return "\n".join(lines[start:start + 5]) + "\n"


def _data(path, **kw) -> Data:
    return Data(**{"dataset": "table", "table": str(path), "annotation": None, **kw})


def _summary(studies) -> dict:
    return {s.id: (s.split, s.patient_id, s.report, s.image_paths, s.views) for s in studies}


def test_docstring_example_csv(tmp_path):
    f = tmp_path / "mine.csv"
    f.write_text(_example())
    studies, skips = build(_data(f))
    assert _summary(studies) == EXPECTED and skips == []
    s1 = studies[0]
    assert (s1.findings, s1.impression, s1.labels) == ("The heart is normal in size. The lungs are clear.",
                                                       "No acute disease.", None)
    impression = {s.id: s.report for s in build(_data(f, sections="impression"))[0]}
    assert impression == {"s001": "no acute disease .", "s002": "cardiomegaly .", "s003": "left effusion .",
                          "s004": "normal chest ."}
    both = {s.id: s.report for s in build(_data(f, sections="findings_impression"))[0]}
    assert both["s002"] == "mild cardiomegaly . no pleural effusion . cardiomegaly ."
    assert [s.image_paths for s in build(_data(f, max_views=1))[0]][0] == ["s001/pa.png"]


def test_parquet_with_list_columns(tmp_path):
    rows = list(csv.DictReader(io.StringIO(_example())))
    for r in rows:
        r["images"] = r["images"].split(";")  # a list column
    f = tmp_path / "mine.parquet"
    pq.write_table(pa.Table.from_pylist(rows), f)
    studies, skips = build(_data(f))
    assert _summary(studies) == EXPECTED and skips == []


def test_report_column_used_as_is(tmp_path):
    f = tmp_path / "t.csv"
    f.write_text("id,split,report,images\na,Validate,\"FINDINGS: Heart normal.\nIMPRESSION: 1. No acute disease.\","
                 "a/0.png\nb, valid ,Lungs clear.,b/0.png\n")
    studies, skips = build(_data(f, sections="impression"))  # sections do not matter with a report column
    assert [(s.id, s.split, s.report, s.findings) for s in studies] == [
        ("a", "val", "findings heart normal . impression . no acute disease .",
         "FINDINGS: Heart normal.\nIMPRESSION: 1. No acute disease."),
        ("b", "val", "lungs clear .", "Lungs clear.")]
    assert [s.patient_id for s in studies] == ["", ""] and studies[0].views == [""]


def test_counted_skips(tmp_path):
    f = tmp_path / "t.csv"
    body = "\n".join([
        "id,split,findings,images,views",
        "ok,train,Heart normal.,ok/0.png;ok/1.png,PA;LATERAL",
        "ok,val,Lungs clear.,ok/9.png,PA",                  # line 3: duplicate id
        "empty,train, . ,empty/0.png,PA",                   # nothing left after cleaning
        "noimg,train,Heart normal., ; ,",                   # no image path
        "where,holdout,Heart normal.,where/0.png,PA",       # unknown split
        "bytes,train,Heart \udcff normal.,bytes/0.png,PA",  # report not UTF-8
        "b\udcffid,train,Heart normal.,x/0.png,PA",         # id not UTF-8
        "out,train,Heart normal.,../../etc/passwd,PA",      # escapes the images directory
        "abs,train,Heart normal.,/abs/0.png,PA",
        "drive,train,Heart normal.,C:\\x\\0.png,PA",
        "views,train,Heart normal.,v/0.png;v/1.png,PA",     # one view for two images
        ",train,Heart normal.,n/0.png,PA",                  # line 13: no id
        "short,train,Heart normal.",                        # line 14: 3 fields
        "",                                                  # a blank line is not a row
        "last,test,Heart normal.,last/0.png,PA",
    ]) + "\n"
    f.write_bytes(body.encode("utf-8", "surrogateescape"))
    studies, skips = build(_data(f))
    assert [s.id for s in studies] == ["ok", "last"]
    assert [(k.id, k.reason) for k in skips] == [
        ("ok", "duplicate_id"), ("empty", "empty_report"), ("noimg", "no_image_path"), ("where", "unknown_split"),
        ("bytes", "report_not_utf8"), ("b\ufffdid", "row_not_utf8"), ("out", "path_outside_images_dir"),
        ("abs", "path_outside_images_dir"), ("drive", "path_outside_images_dir"), ("views", "views_mismatch"),
        ("line 13", "missing_id"), ("line 14", "malformed_row")]
    assert skips[0].detail.startswith("line 3")


def test_parquet_bytes_not_utf8(tmp_path):
    f = tmp_path / "t.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "split": ["train", "test"],
                             "findings": pa.array([b"Heart \xff normal.", b"Lungs clear."], pa.binary()),
                             "images": [["a/0.png"], []]}), f)
    studies, skips = build(_data(f))
    assert studies == [] and [(k.id, k.reason) for k in skips] == [("a", "report_not_utf8"), ("b", "no_image_path")]


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="table not found"):
        build(_data(tmp_path / "nope.csv"))
    f = tmp_path / "t.csv"
    f.write_text("id,split,findings\na,train,Heart normal.\n")
    with pytest.raises(ValueError, match=r"t\.csv: missing column 'images'"):
        build(_data(f))
    f.write_text("id,split,findings,images\na,train,Heart normal.,a.png\n")
    with pytest.raises(ValueError, match=r"missing column 'impression' \(data.sections=impression"):
        build(_data(f, sections="impression"))
    f.write_text("")
    with pytest.raises(ValueError, match="empty file"):
        build(_data(f))
    (tmp_path / "t.xlsx").write_text("x")
    with pytest.raises(ValueError, match="unknown table type"):
        build(_data(tmp_path / "t.xlsx"))
    (tmp_path / "t.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match="not a readable parquet"):
        build(_data(tmp_path / "t.parquet"))


def test_helpers():
    assert join_sections(["No effusion", "Normal."]) == "No effusion. Normal."
    assert join_sections(["", "Normal"]) == "Normal" and join_sections(["", ""]) == ""
    assert [outside_root(p) for p in ("a/b.png", "a/../b.png", "..", "/a", "\\\\srv\\a", "C:/a", "a..b/c")] == [
        False, True, True, True, True, True, False]
