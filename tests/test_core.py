"""Config validation, atomic IO, devices, progress, report cleaning, image decoding."""

import json
import logging

import numpy as np
import pytest
import yaml
from PIL import Image

from amrg.config import ParamsError, load_params, parse_params
from amrg.data.annotation import load_annotation as load_iu_xray
from amrg.data.clean import clean_report, report_sentences
from amrg.data.chunks import decode_chunk
from amrg.data.images import ImageError, decode_image
from amrg.io import load_checkpoint, progress, read_json, resolve_device, save_checkpoint


def test_repo_params_are_valid():
    p = load_params("params.yaml")
    assert p.cam.patch * 14 == p.data.image_size and p.qformer.n_queries == 14


def test_params_errors_name_every_bad_key():
    raw = yaml.safe_load(open("params.yaml"))
    raw["cam"]["tua"] = 0.3
    raw["hopfield"]["beta"] = "four"
    raw["llm"]["source"] = "hub"
    raw["classifier"]["epochs"] = 0
    raw["bogus"] = {}
    with pytest.raises(ParamsError) as e:
        parse_params(raw)
    msg = str(e.value)
    for key in ("cam.tua: unknown key", "hopfield.beta: expected float", "llm.source: 'hub'",
                "classifier.epochs must be > 0", "bogus: unknown key"):
        assert key in msg


@pytest.mark.parametrize("data, message", [
    ({"dataset": "mimic_cxr", "annotation": None}, "data.root is required with data.dataset=mimic_cxr"),
    ({"dataset": "mimic_cxr", "root": "r"}, "data.reports is required with data.dataset=mimic_cxr"),
    ({"dataset": "table"}, "data.table is required with data.dataset=table"),
    ({"images": "files"}, "data.images=files needs data.images_dir"),
    ({"dataset": "chexpert"}, "data.dataset: 'chexpert' is not one of"),
    ({"chunk_images": 0}, "data.chunk_images must be > 0"),
    ({"sections": "both"}, "data.sections: 'both' is not one of"),
])
def test_data_params_say_what_a_dataset_needs(data, message):
    with pytest.raises(ParamsError, match=message):
        parse_params({"data": data})


def test_data_paths_and_cleaner_follow_the_dataset():
    d = parse_params({"data": {"dataset": "mimic_cxr", "root": "/m", "reports": "/r.zip", "images": "files"}}).data
    assert d.image_root == "/m" and d.report_cleaner == "mimic"
    d = parse_params({"data": {"images": "files", "images_dir": "/iu", "root": "/x"}}).data
    assert d.image_root == "/iu" and d.report_cleaner == "iu"
    assert parse_params({}).data.image_root is None  # phantom images read no files


def test_params_int_accepted_for_float_and_bool_not_int():
    raw = {"hopfield": {"beta": 8}, "cam": {"batch_size": True}}
    with pytest.raises(ParamsError, match="cam.batch_size: expected int"):
        parse_params(raw)
    assert parse_params({"hopfield": {"beta": 8}}).hopfield.beta == 8.0


def test_checkpoint_refuses_pickled_code(tmp_path):
    import torch

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, bad)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        load_checkpoint(bad)
    save_checkpoint(tmp_path / "ok.pt", {"w": torch.ones(2), "n": 3})
    assert load_checkpoint(tmp_path / "ok.pt")["n"] == 3


@pytest.mark.parametrize("raw,clean", [
    ("The heart is normal in size. The lungs are clear.", "the heart is normal in size . the lungs are clear ."),
    ("1. No acute disease. 2. Stable (old) granuloma.", "no acute disease . stable old granuloma ."),
    ("No XXXX of pleural effusion.. Heart: normal; T-spine ok", "no xxxx of pleural effusion . heart normal t-spine ok ."),
    ("   . . ", ""),
])
def test_clean_report_follows_r2gen(raw, clean):
    assert clean_report(raw) == clean


def test_report_sentences_round_trip():
    c = clean_report("Heart normal. Lungs clear. No effusion.")
    assert report_sentences(c) == ["heart normal", "lungs clear", "no effusion"]


def test_iu_adapter_counts_skips(tmp_path):
    ann = {"train": [{"id": "a", "report": "Heart normal.", "image_path": ["a/0.png", "a/1.png"], "split": "train"},
                     {"id": "a", "report": "dup.", "image_path": ["a/0.png"], "split": "train"},
                     {"id": "b", "report": "   ", "image_path": ["b/0.png"], "split": "train"},
                     {"id": "c", "report": 5, "image_path": ["c/0.png"], "split": "train"}],
           "test": [{"id": "d", "report": "Lungs clear.", "image_path": [], "split": "test"}]}
    f = tmp_path / "ann.json"
    f.write_text(json.dumps(ann))
    studies, skips = load_iu_xray(f)
    assert [s.id for s in studies] == ["a"] and studies[0].report == "heart normal ."
    assert {s.reason for s in skips} == {"duplicate_id", "empty_report", "report_not_string", "no_image_path"}
    f.write_text(json.dumps({"training": []}))
    with pytest.raises(ValueError, match="unknown split keys"):
        load_iu_xray(f)


def test_decode_image_modes_and_errors(tmp_path):
    rgba = np.zeros((40, 60, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    img16 = (np.arange(40 * 40, dtype=np.uint16).reshape(40, 40) * 40)
    Image.fromarray(img16).save(tmp_path / "x16.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 10)
    out = decode_image(tmp_path, "rgba.png", 32)
    assert out.shape == (32, 32) and out.dtype == np.uint8 and abs(int(out.mean()) - 60) <= 2  # 0.299*200
    g16 = decode_image(tmp_path, "x16.png", 32)
    assert g16.min() <= 5 and g16.max() >= 250
    rels = ["bad.png", "missing.png", "../etc/passwd", "/etc/passwd", "rgba.png", "x16.png"]
    ok, errors = decode_chunk(rels, str(tmp_path), 32)  # preprocess's chunk of decode jobs
    assert [(i, r) for i, r, _ in errors] == [(0, "unreadable_image"), (1, "missing_image"),
                                              (2, "path_outside_images_dir"), (3, "path_outside_images_dir")]
    assert ok.shape == (2, 32, 32) and np.array_equal(ok[0], out) and np.array_equal(ok[1], g16)  # in job order
    (tmp_path / "link.png").symlink_to("/etc/hostname")
    with pytest.raises(ImageError, match="path_outside_images_dir"):
        decode_image(tmp_path, "link.png", 32)


def test_log_history_writes_dvc_plot_files(tmp_path):
    from stages.common import log_history

    log_history(tmp_path, [{"epoch": 1, "train_loss": 2.0, "val_auroc_label/Edema": 0.5},
                           {"epoch": 2, "train_loss": 1.5, "val_auroc_label/Edema": 0.75}])
    root = tmp_path / "dvclive"
    assert (root / "plots/metrics/train_loss.tsv").read_text() == "step\ttrain_loss\n0\t2.0\n1\t1.5\n"
    assert (root / "plots/metrics/val_auroc_label/Edema.tsv").read_text() == "step\tEdema\n0\t0.5\n1\t0.75\n"
    assert read_json(root / "metrics.json") == {"train_loss": 1.5, "val_auroc_label/Edema": 0.75, "step": 1}


def test_tiny_overlay_merges_into_valid_params(tmp_path):
    from amrg.config import merge_overlay

    from ._workspace import tiny_params

    assert merge_overlay({"a": {"b": 1, "c": 2}, "d": 3}, {"a": {"b": 9}, "e": 4}) == {"a": {"b": 9, "c": 2}, "d": 3, "e": 4}
    raw = tiny_params("params.yaml", {"generator": {"checkpoint_every": 1}})
    params = parse_params(raw)
    assert params.data.max_studies == 12 and params.generator.epochs == 1 and params.generator.checkpoint_every == 1
    assert params.hopfield == load_params("params.yaml").hopfield  # untouched sections stay as they are


def test_resolve_device():
    import torch

    assert resolve_device("cpu") == torch.device("cpu")
    auto = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("auto") == resolve_device(None) == auto
    if not torch.cuda.is_available():
        for dev in ("cuda", "cuda:1", torch.device("cuda")):
            with pytest.raises(RuntimeError, match="no CUDA device is visible"):
                resolve_device(dev)


def _throughput_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "amrg.io"]


def test_progress_bar_and_one_throughput_line(caplog, capsys):
    caplog.set_level(logging.INFO, logger="amrg.io")
    assert list(progress(iter(range(5)), "count things", total=5, unit="things")) == [0, 1, 2, 3, 4]
    lines = _throughput_lines(caplog)
    assert len(lines) == 1 and lines[0].startswith("count things: 5 things in ") and lines[0].endswith(" things/s)")
    assert "count things" in capsys.readouterr().err  # the tqdm bar (rank 0)
    caplog.clear()
    # batches: count() says how many units each item is; total defaults to len() without count
    starts = range(0, 10, 4)
    assert list(progress(starts, "batches", unit="rows", total=10, count=lambda s: min(4, 10 - s))) == [0, 4, 8]
    assert _throughput_lines(caplog)[0].startswith("batches: 10 rows in ")
    caplog.clear()
    for i in progress([1, 2, 3], "left early"):  # a loop left early logs no throughput
        break
    assert _throughput_lines(caplog) == []


def test_progress_is_silent_off_rank_0(caplog, capsys, monkeypatch):
    from amrg import dist

    monkeypatch.setattr(dist, "context", lambda: dist.Context(rank=1, world=2))
    caplog.set_level(logging.INFO, logger="amrg.io")
    assert list(progress([1, 2], "rank one")) == [1, 2]
    assert _throughput_lines(caplog) == [] and "rank one" not in capsys.readouterr().err
