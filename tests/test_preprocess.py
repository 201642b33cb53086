"""preprocess on real image files: bad inputs become counted skips in stats.json, never silent drops."""

import json

import numpy as np
import pytest
import yaml
from PIL import Image

from amrg.cli import main as cli
from amrg.data.phantoms import draw_phantom
from amrg.data.store import load_images, load_studies
from amrg.layout import Layout
from stages import preprocess

ROOT_PARAMS = yaml.safe_load(open("params.yaml"))


def _write_case(tmp_path):
    img_dir = tmp_path / "images"
    entries = []
    for i in range(6):
        sid = f"s{i}"
        (img_dir / sid).mkdir(parents=True)
        for v in range(2):
            Image.fromarray(draw_phantom(np.full(14, np.nan), v, 64, i)).save(img_dir / sid / f"{v}.png")
        entries.append({"id": sid, "report": "The heart is normal. No pleural effusion.",
                        "image_path": [f"{sid}/0.png", f"{sid}/1.png"], "split": "train"})
    (img_dir / "s1" / "1.png").unlink()                                     # one view missing
    (img_dir / "s2" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")       # one corrupt view
    for v in range(2):                                                      # both views unreadable
        (img_dir / "s3" / f"{v}.png").write_bytes(b"not an image")
    entries[4]["report"] = "  "                                              # empty report
    entries[5]["image_path"] = ["../../etc/passwd", "s5/0.png"]              # escapes images_dir
    entries.append(dict(entries[0]))                                         # duplicate id
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"train": entries, "val": [], "test": []}))
    params = dict(ROOT_PARAMS)
    params["data"] = dict(params["data"], annotation=str(ann), images="files", images_dir=str(img_dir), image_size=64)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path / "params.yaml"


def test_bad_inputs_are_counted_skips(tmp_path, monkeypatch):
    params = _write_case(tmp_path)
    preprocess.main(["--params", str(params), "--artifacts", str(tmp_path / "artifacts")])
    stats = json.loads((tmp_path / "artifacts/preprocess/stats.json").read_text())
    assert stats["phantom_images"] is False
    assert stats["skipped_by_reason"] == {"duplicate_id": 1, "empty_report": 1, "missing_image": 1,
                                          "unreadable_image": 3, "no_readable_image": 1,
                                          "path_outside_images_dir": 1}
    studies = load_studies(tmp_path / "artifacts/preprocess/studies.parquet")
    assert studies.ids == ["s0", "s1", "s2", "s5"]
    images = load_images(Layout(tmp_path / "artifacts").images, Layout(tmp_path / "artifacts").pixels)
    assert sorted(zip(images.study_ids, images.views.tolist())) == [("s0", 0), ("s0", 1), ("s1", 0), ("s2", 1), ("s5", 1)]
    assert images.pixels.shape == (5, 64, 64)
    assert images.study_views(["s1"]).tolist() == [[2, 2]]  # single view repeated


def test_cli_check_names_bad_key(tmp_path, capsys):
    bad = dict(ROOT_PARAMS, decode=dict(ROOT_PARAMS["decode"], num_beam=3))
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(bad))
    assert cli(["check", "--params", str(tmp_path / "p.yaml")]) == 2
    assert "decode.num_beam: unknown key" in capsys.readouterr().err
    assert cli(["check"]) == 0


def test_stage_rejects_unknown_key_before_compute(tmp_path, monkeypatch):
    bad = dict(ROOT_PARAMS, data=dict(ROOT_PARAMS["data"], image_szie=64))
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(Exception, match="data.image_szie: unknown key"):
        preprocess.main(["--params", str(tmp_path / "p.yaml"), "--artifacts", str(tmp_path / "artifacts")])
    assert not (tmp_path / "artifacts").exists()


def test_parallel_phantoms_equal_serial(tmp_path):
    from functools import partial

    from amrg.data.chunks import phantom_chunk, produce
    from amrg.data.phantoms import draw_phantom

    rng = np.random.default_rng(0)
    jobs = [(rng.choice([np.nan, 0.0, 1.0, -1.0], 14).tolist(), i % 2, i // 2) for i in range(40)]
    make = partial(phantom_chunk, size=64)
    pooled = np.concatenate([np.load(f) for f in produce(jobs, make, tmp_path / "pool", 8, 2, "fp")[0]])
    serial = np.concatenate([np.load(f) for f in produce(jobs, make, tmp_path / "one", 40, 1, "fp")[0]])
    assert np.array_equal(pooled, serial) and pooled.shape == (40, 64, 64)
    assert np.array_equal(serial[7], draw_phantom(*jobs[7][:2], 64, jobs[7][2]))
