"""The bad-input matrix: every kind of bad input is a clear error or a counted skip listed in
``stats.json`` (reason + study id), never a silent drop, and nothing good is lost with it."""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from amrg.config import ParamsError, parse_params
from amrg.data.phantoms import draw_phantom
from amrg.data.store import load_images, load_studies
from amrg.layout import Layout
from stages import preprocess

ROOT_PARAMS = yaml.safe_load(open("params.yaml"))
REPORT = "The heart is normal in size. No pleural effusion."


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG") if mode else Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _png_bomb() -> bytes:
    """A valid 1x1 PNG whose header claims 40000 x 40000 pixels (PIL's decompression-bomb limit)."""
    raw = bytearray(_png(np.zeros((1, 1), np.uint8)))
    ihdr = raw.index(b"IHDR")
    raw[ihdr + 4:ihdr + 12] = struct.pack(">II", 40000, 40000)
    raw[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(raw[ihdr:ihdr + 17])) & 0xFFFFFFFF)
    return bytes(raw)


GOOD = draw_phantom(np.full(14, np.nan), 0, 64, 0)

# study id -> (report, {view file: bytes | None (absent)} | image_path list, expected outcome)
# outcome: "kept" (both views), "kept:1" (one view kept), or the study-level skip reason
CASES = {
    "ok": (REPORT, {"0.png": _png(GOOD), "1.png": _png(GOOD)}, "kept"),
    "png16": (REPORT, {"0.png": _png((GOOD.astype(np.uint16) * 257)), "1.png": _png(GOOD)}, "kept"),
    "rgba": (REPORT, {"0.png": _png(np.dstack([GOOD] * 3 + [np.full_like(GOOD, 255)]), "RGBA"),
                      "1.png": _png(np.dstack([GOOD] * 3))}, "kept"),
    "jpeg": (REPORT, {"0.jpg": _jpeg(GOOD), "1.jpg": _jpeg(GOOD)}, "kept"),
    "corrupt_png": (REPORT, {"0.png": b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 8, "1.png": _png(GOOD)}, "kept:1"),
    "corrupt_jpeg": (REPORT, {"0.jpg": b"\xff\xd8\xff\xe0" + bytes(range(256)) * 2, "1.png": _png(GOOD)}, "kept:1"),
    "truncated_png": (REPORT, {"0.png": _png(GOOD)[: len(_png(GOOD)) // 2], "1.png": _png(GOOD)}, "kept:1"),
    "truncated_jpeg": (REPORT, {"0.jpg": _jpeg(GOOD)[: len(_jpeg(GOOD)) // 2], "1.png": _png(GOOD)}, "kept:1"),
    "empty_file": (REPORT, {"0.png": b"", "1.png": b""}, "no_readable_image"),
    "bomb": (REPORT, {"0.png": _png_bomb(), "1.png": _png(GOOD)}, "kept:1"),
    "missing": (REPORT, {"0.png": None, "1.png": None}, "no_readable_image"),
    "empty_report": ("", {"0.png": _png(GOOD), "1.png": _png(GOOD)}, "empty_report"),
    "blank_report": (" \t\n  . ", {"0.png": _png(GOOD), "1.png": _png(GOOD)}, "empty_report"),
    "surrogate_report": ("The heart \udcff is normal.", {"0.png": _png(GOOD), "1.png": _png(GOOD)},
                         "report_not_utf8"),
    "dotdot": (REPORT, ["../../etc/passwd", "../outside.png"], "no_readable_image"),
    "absolute": (REPORT, ["/etc/passwd", "/etc/hostname"], "no_readable_image"),
    "symlink": (REPORT, ["symlink/0.png", "symlink/1.png"], "no_readable_image"),
}
# image-level skip reasons each case adds
IMAGE_SKIPS = {"corrupt_png": ["unreadable_image"], "corrupt_jpeg": ["unreadable_image"],
               "truncated_png": ["unreadable_image"], "truncated_jpeg": ["unreadable_image"],
               "empty_file": ["unreadable_image"] * 2, "bomb": ["image_too_large"],
               "missing": ["missing_image"] * 2, "dotdot": ["path_outside_images_dir"] * 2,
               "absolute": ["path_outside_images_dir"] * 2, "symlink": ["path_outside_images_dir"] * 2}


def _write_dataset(tmp_path):
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    outside = tmp_path / "outside.png"
    outside.write_bytes(_png(GOOD))  # a readable image outside the tree: must still be refused
    entries = []
    for sid, (report, views, _) in CASES.items():
        if isinstance(views, dict):
            (img_dir / sid).mkdir()
            for name, data in views.items():
                if data is not None:
                    (img_dir / sid / name).write_bytes(data)
            paths = [f"{sid}/{name}" for name in views]
        else:
            paths = views
        entries.append({"id": sid, "report": report, "image_path": paths, "split": "train"})
    (img_dir / "symlink").mkdir()
    (img_dir / "symlink" / "0.png").symlink_to(outside)
    (img_dir / "symlink" / "1.png").symlink_to("/etc/hostname")
    duplicate = {"id": "ok", "report": "A duplicate.", "image_path": ["ok/0.png"], "split": "val"}
    text = json.dumps({"train": entries, "val": [duplicate], "test": []})
    (tmp_path / "ann.json").write_text(text, encoding="utf-8")
    return img_dir


def _params(tmp_path, img_dir, annotation):
    params = dict(ROOT_PARAMS)
    params["data"] = dict(params["data"], annotation=str(annotation), images="files", images_dir=str(img_dir), image_size=64)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_bad_input_matrix(tmp_path, monkeypatch):
    img_dir = _write_dataset(tmp_path)
    params = _params(tmp_path, img_dir, tmp_path / "ann.json")
    preprocess.main(["--params", str(params), "--artifacts", str(tmp_path / "artifacts")])
    stats = json.loads((tmp_path / "artifacts/preprocess/stats.json").read_text())

    kept = sorted(s for s, (_, _, out) in CASES.items() if out.startswith("kept"))
    studies = load_studies(tmp_path / "artifacts/preprocess/studies.parquet")
    assert sorted(studies.ids) == kept  # every good study kept, each exactly once
    images = load_images(Layout(tmp_path / "artifacts").images, Layout(tmp_path / "artifacts").pixels)
    per_study = Counter(images.study_ids)
    assert {s: per_study[s] for s in kept} == {s: 1 if CASES[s][2] == "kept:1" else 2 for s in kept}
    assert images.pixels.dtype == np.uint8 and images.pixels.shape[1:] == (64, 64)
    rows = {(s, int(v)): i for i, (s, v) in enumerate(zip(images.study_ids, images.views))}
    g16, g8 = images.pixels.read(rows[("png16", 0)]), images.pixels.read(rows[("ok", 0)])
    # 16-bit: rescaled by its own range to uint8, the same picture (contrast-stretched)
    assert g16.min() == 0 and g16.max() == 255 and np.corrcoef(g16.ravel(), g8.ravel())[0, 1] > 0.99
    rgba = images.pixels.read(rows[("rgba", 0)])
    assert np.abs(rgba.astype(int) - g8.astype(int)).max() <= 2  # RGBA/RGB -> the same luminance

    # every skip is listed with its study id and reason; the counts add up
    expected = Counter()
    for sid, (_, _, out) in CASES.items():
        expected.update(IMAGE_SKIPS.get(sid, []))
        if not out.startswith("kept"):
            expected[out] += 1
    expected["duplicate_id"] += 1
    assert stats["skipped_by_reason"] == dict(expected)
    assert stats["skipped"] == sum(expected.values()) == len(stats["skips"])
    listed = Counter((s["id"], s["reason"]) for s in stats["skips"])
    for sid, reasons in IMAGE_SKIPS.items():
        for reason in set(reasons):
            assert listed[(sid, reason)] == reasons.count(reason), (sid, reason)
    assert listed[("ok", "duplicate_id")] == 1
    # nothing lost: each input study is either kept or has a study-level skip
    study_level = {s["id"] for s in stats["skips"] if s["reason"] in
                   {"empty_report", "report_not_utf8", "no_readable_image", "duplicate_id"}}
    assert set(CASES) == set(kept) | (study_level - {"ok"})
    bad_detail = [s["detail"] for s in stats["skips"] if s["reason"] == "path_outside_images_dir"]
    assert "../../etc/passwd" in bad_detail and "/etc/passwd" in bad_detail


def test_non_utf8_annotation_is_a_clear_error(tmp_path, monkeypatch):
    ann = tmp_path / "ann.json"
    ann.write_bytes(json.dumps({"train": [{"id": "a", "report": "X", "image_path": ["a.png"]}]})
                    .encode().replace(b'"X"', b'"caf\xe9 heart"'))  # latin-1 byte: not UTF-8
    params = _params(tmp_path, tmp_path, ann)
    with pytest.raises(ValueError, match=r"ann.json is not UTF-8 JSON"):
        preprocess.main(["--params", str(params), "--artifacts", str(tmp_path / "artifacts")])
    assert not (tmp_path / "artifacts").exists()


@pytest.mark.parametrize("section,key,value,message", [
    ("classifier", "epochs", "four", "classifier.epochs: expected int, got str"),
    ("classifier", "epochs", 0, "classifier.epochs must be > 0"),
    ("cam", "tau", "high", "cam.tau: expected float"),
    ("hopfield", "beta", [4.0], "hopfield.beta: expected float"),
    ("data", "max_studies", -3, "data.max_studies"),
    ("decode", "num_beams", 0, "decode.num_beams"),
    ("cam", "tua", 0.4, "cam.tua: unknown key"),
])
def test_params_of_wrong_type_or_range(section, key, value, message):
    raw = json.loads(json.dumps(ROOT_PARAMS))
    raw[section][key] = value
    with pytest.raises(ParamsError, match=message.replace(".", r"\.").replace("(", r"\(")):
        parse_params(raw)


def test_nan_or_inf_in_a_bank_is_refused(tmp_path):
    from amrg.io import load_tensors, save_tensors
    from amrg.models.hopfield import HopfieldRetrieval

    for bad in (float("nan"), float("inf")):
        bank = torch.randn(8, 16)
        bank[3, 5] = bad
        save_tensors(tmp_path / "bank.safetensors", {"bank": bank})
        loaded = load_tensors(tmp_path / "bank.safetensors")["bank"]
        with pytest.raises(ValueError, match="NaN or inf"):
            HopfieldRetrieval(16, loaded, 16, 16)


def test_report_bank_stage_refuses_non_finite_vectors(tmp_path, monkeypatch):
    """encode_report_bank checks its vectors like encode_visual_bank: no NaN/inf bank is ever written."""
    from amrg.models import text_encoder
    from stages import encode_report_bank

    params = json.loads(json.dumps(ROOT_PARAMS))
    params["data"]["annotation"] = str(Path(__file__).resolve().parents[1] / "data/iu_xray/annotation.json")
    params["data"]["max_studies"] = 6
    params["banks"]["report"]["size"] = 10
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    preprocess.main(["--params", str(tmp_path / "params.yaml"), "--artifacts", str(tmp_path / "artifacts")])

    def nan_encode(self, sentences, batch_size):
        out = np.ones((len(sentences), 8), np.float32)
        out[0, 0] = np.nan
        return out

    monkeypatch.setattr(text_encoder.SentenceEncoder, "__init__", lambda self, *a, **k: None)
    monkeypatch.setattr(text_encoder.SentenceEncoder, "encode", nan_encode)
    with pytest.raises(FloatingPointError, match="report bank has NaN/inf"):
        encode_report_bank.main(["--params", str(tmp_path / "params.yaml"), "--artifacts", str(tmp_path / "artifacts")])
    assert not (tmp_path / "artifacts/banks/report/bank.safetensors").exists()


def test_visual_bank_stage_refuses_non_finite_rows(tmp_path, monkeypatch):
    """encode_visual_bank refuses a bank with a NaN or inf row (README: both banks are checked): a clear
    error, and no bank is written. Inputs come from the real preprocess, train_classifier and mine_cam."""
    from amrg.io import load_tensors
    from amrg.layout import Layout
    from stages import encode_visual_bank, mine_cam, train_classifier

    params = json.loads(json.dumps(ROOT_PARAMS))
    params["data"]["annotation"] = str(Path(__file__).resolve().parents[1] / "data/iu_xray/annotation.json")
    params["data"]["max_studies"] = 3
    params["classifier"].update(epochs=1, batch_size=8)
    params["cam"].update(tau=0.0, max_per_disease=2, batch_size=4, n_overlays=0)
    params["runtime"].update(device="cpu", precision="fp32")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    argv = ["--params", str(tmp_path / "params.yaml"), "--artifacts", str(tmp_path / "artifacts"),
            "--checkpoints", str(tmp_path / "checkpoints")]
    for stage in (preprocess, train_classifier, mine_cam):
        stage.main(argv)
    bank = Layout(tmp_path / "artifacts").visual_bank
    real_pool = encode_visual_bank.masked_mean_pool
    for bad in (float("nan"), float("inf")):
        def poisoned(tokens, mask, bad=bad):  # one entry of the first region's vector is not finite
            out = real_pool(tokens, mask).clone()
            out[0, 0] = bad
            return out

        monkeypatch.setattr(encode_visual_bank, "masked_mean_pool", poisoned)
        with pytest.raises(FloatingPointError, match="visual bank has NaN/inf"):
            encode_visual_bank.main(argv)
        assert not bank.exists()
    monkeypatch.setattr(encode_visual_bank, "masked_mean_pool", real_pool)
    encode_visual_bank.main(argv)  # the same inputs with finite vectors: the bank is written
    assert bank.exists() and torch.isfinite(load_tensors(bank)["bank"]).all()
