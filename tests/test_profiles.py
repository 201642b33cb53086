"""Profiles as overlays (amrg.profiles, ``python -m amrg.cli profile``): the paper profiles give exactly the
values of the full files they replaced (``profiles_before.json``: every key of configs/paper-*.yaml as parsed
before the rewrite, commit 16aead2), the official profiles validate and hold what the released code runs,
``extends`` chains apply parent first, mapping-valued keys are replaced, unknown keys and loops are refused, and
the CLI writes a full params file that ``amrg check`` accepts and that is refused as the base of another."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from amrg import cli
from amrg.config import ParamsError, get_dotted, load_params, to_dict
from amrg.profiles import HEADER, chain, materialise

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
BASE = ROOT / "params.yaml"
BEFORE = json.loads((Path(__file__).parent / "profiles_before.json").read_text())
DATASETS = ("iu", "mimic", "chexpert-plus")


def _params(name: str):
    return materialise(CONFIGS / f"{name}.yaml", BASE)[1]


@pytest.mark.parametrize("name", sorted(BEFORE))
def test_paper_profiles_keep_the_values_of_the_full_files(name):
    now = to_dict(_params(name))
    differ = {k: (v, get_dotted(now, k)) for k, v in BEFORE[name].items() if get_dotted(now, k) != v}
    assert not differ, f"{name}: (before, now) {differ}"
    assert len(BEFORE[name]) > 100  # the snapshot is every key, not a sample


def test_paper_profiles_are_overlays_of_one_base():
    for d in DATASETS:
        assert [p.name for p in chain(CONFIGS / f"paper-{d}.yaml")] == (
            ["paper-mimic.yaml"] if d == "mimic" else ["paper-mimic.yaml", f"paper-{d}.yaml"])
        official = [p.name for p in chain(CONFIGS / f"official-{d}.yaml")]
        assert official[:2] == ["paper-mimic.yaml", "official-mimic.yaml"]
    for f in CONFIGS.glob("*.yaml"):
        assert len(f.read_text().splitlines()) < 80, f"{f.name}: an overlay holds only what differs"
    # the new keys the paper text fixes: beta as the inverse temperature, the top-six rule (IV-E)
    p = _params("paper-mimic")
    assert (p.hopfield.scaling, p.hopfield.beta, p.cam.max_patches) == ("beta", 4.0, 6)


@pytest.mark.parametrize("d", DATASETS)
def test_official_profiles_hold_what_the_released_code_runs(d):
    o, paper = _params(f"official-{d}"), _params(f"paper-{d}")
    assert o.data == paper.data  # the same data section as the paper profile of the dataset
    h = o.hopfield
    assert (h.scaling, h.beta, h.normalize, h.heads, h.dim, h.dropout) == ("beta", 4.0, True, 6, 1024, 0.1)
    assert (o.cam.tau, o.cam.max_patches, o.cam.select, o.banks.visual.unit) == (0.75, 6, "random", "patch")
    assert (o.banks.report.pooling, o.banks.report.encoder) == ("cls", "emilyalsentzer/Bio_ClinicalBERT")
    assert (o.qformer.kind, o.qformer.layers, o.qformer.cross_attention_frequency) == ("blip2", 12, 2)
    g = o.generator
    template = "Human: <Img>{image}</Img> {prompt} \nAssistant:"
    assert (g.prompt_template, g.embed_norm, g.views) == (template, True, "mean")
    assert (g.select, g.select_decode, g.batch_size, o.classifier.ortho_weight) == ("val_bleu4", "configured", 2, 0.0)
    dec = o.decode
    assert (dec.num_beams, dec.repetition_penalty, dec.length_penalty) == (3, 2.0, 2.0)
    iu = d == "iu"
    assert (dec.min_new_tokens, dec.max_new_tokens) == ((40, 100) if iu else (80, 120))
    assert (g.max_report_tokens, o.evaluate.reference_max_tokens, g.epochs) == ((60, 60, 30) if iu else (100, 100, 10))
    llm = "Qwen/Qwen1.5-0.5B-Chat" if iu else "meta-llama/Llama-2-7b-chat-hf"
    assert (o.llm.name, o.llm.trainable) == (llm, "none")


def test_every_profile_materialises():
    for f in sorted(CONFIGS.glob("*.yaml")):
        materialise(f, BASE)


def _write(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


def test_extends_applies_the_parent_first_and_replaces_mappings(tmp_path):
    _write(tmp_path / "a.yaml", {"hopfield": {"beta": 2.0, "dim": 32}, "vision": {"kwargs": {"embed_dim": 32}}})
    _write(tmp_path / "b.yaml", {"extends": "a", "hopfield": {"beta": 8.0}, "vision": {"kwargs": {"depths": [1]}}})
    raw, p = materialise(tmp_path / "b.yaml", BASE)
    assert (p.hopfield.beta, p.hopfield.dim) == (8.0, 32)  # the child wins, the parent's other keys stay
    assert p.vision.kwargs == {"depths": [1]}  # replaced whole, not merged with a's or params.yaml's preset
    base = load_params(BASE)
    assert p.llm == base.llm and raw["llm"] == yaml.safe_load(BASE.read_text())["llm"]  # the rest: params.yaml


def test_bad_profiles_are_refused(tmp_path):
    _write(tmp_path / "typo.yaml", {"extends": "paper-mimic", "hopfield": {"betta": 2.0}})
    (tmp_path / "paper-mimic.yaml").write_text((CONFIGS / "paper-mimic.yaml").read_text())
    with pytest.raises(ParamsError, match=r"(?s)typo.yaml: .*hopfield.betta: unknown key"):
        materialise(tmp_path / "typo.yaml", BASE)
    _write(tmp_path / "x.yaml", {"extends": "y"})
    _write(tmp_path / "y.yaml", {"extends": "x"})
    with pytest.raises(ParamsError, match="loops back"):
        materialise(tmp_path / "x.yaml", BASE)
    with pytest.raises(ParamsError, match="not found"):
        materialise(_write(tmp_path / "z.yaml", {"extends": "nowhere"}), BASE)
    with pytest.raises(ParamsError, match=r"hopfield.beta must be > 0"):
        materialise(_write(tmp_path / "neg.yaml", {"hopfield": {"beta": -1.0}}), BASE)


def test_cli_writes_a_full_valid_params_file(tmp_path, capsys):
    out = tmp_path / "params.yaml"
    assert cli.main(["profile", str(CONFIGS / "official-iu.yaml"), "-o", str(out), "--base", str(BASE)]) == 0
    text = out.read_text()
    assert text.startswith(HEADER) and "official-mimic.yaml" in text.splitlines()[1]
    assert load_params(out) == _params("official-iu")  # the full file, every key written
    assert set(yaml.safe_load(text)) >= set(yaml.safe_load(BASE.read_text()))
    assert cli.main(["check", "--params", str(out)]) == 0
    # a materialised profile is not the embedded default: refused as a base, the file is left as it is
    assert cli.main(["profile", str(CONFIGS / "paper-iu.yaml"), "-o", str(out), "--base", str(out)]) == 2
    assert "is itself a materialised profile" in capsys.readouterr().err and out.read_text() == text
    assert cli.main(["profile", str(CONFIGS / "paper-iu.yaml"), "--base", str(BASE)]) == 0  # stdout
    assert yaml.safe_load(capsys.readouterr().out)["data"]["images_dir"] == "/path/to/iu_xray/images"
