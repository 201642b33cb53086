"""The evaluation library (amrg.evaluation): CAM localisation on phantoms against known answers, the
compact headline table, sample picking, the checkpoint-selection rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from amrg.data.phantoms import draw_phantom, phantom_regions, phantom_seed
from amrg.evaluation import EvalSplit, phantom_localisation, pick_samples, summary
from amrg.labels.schema import CHEXPERT_14
from amrg.train import Selection

SIZE = 64


class _FakeRun:
    """``cams`` returns a chosen map per (image, disease): the drawn region itself, or a uniform map."""

    def __init__(self, test, views, seed, kind):
        self.test, self.views, self.seed, self.kind = test, views, seed, kind

    def cams(self, images, diseases, method, batch_size, backend="auto"):
        out = []
        for img, d in zip(images, diseases):
            r = next(r for r in range(len(self.test.pixels)) if torch.equal(self.test.pixels[r], img))
            s = next(s for s, rows in enumerate(self.test.view_rows) if r in rows.tolist())
            region = phantom_regions(self.test.ref_labels[s], int(self.views[r]) % 2, SIZE,
                                     phantom_seed(self.test.ids[s], self.seed))[CHEXPERT_14[d]]
            out.append(region.astype(np.float32) if self.kind == "oracle" else np.full((SIZE, SIZE), 0.5, np.float32))
        return np.stack(out)


@pytest.fixture(scope="module")
def phantom_test():
    seed = 3
    labels = np.full((2, 14), np.nan, np.float32)
    labels[0, CHEXPERT_14.index("Pleural Effusion")] = 1
    labels[1, CHEXPERT_14.index("Cardiomegaly")] = 1
    labels[1, CHEXPERT_14.index("Lung Lesion")] = 1
    ids = ["s0", "s1"]
    pixels = np.stack([draw_phantom(labels[s], v, SIZE, phantom_seed(ids[s], seed)) for s in range(2) for v in range(2)])
    views = np.array([0, 1, 0, 1])
    return EvalSplit(ids, ["", ""], labels, np.array([[0, 1], [2, 3]]), torch.from_numpy(pixels)), views, seed


def test_phantom_localisation_known_answers(phantom_test):
    test, views, seed = phantom_test
    oracle = phantom_localisation(_FakeRun(test, views, seed, "oracle"), test, test.ref_labels, views, seed, "gradcam", 8)
    regions = [(s, r, n, m) for s, rows in enumerate(test.view_rows) for r in rows.tolist()
               for n, m in phantom_regions(test.ref_labels[s], int(views[r]) % 2, SIZE,
                                           phantom_seed(test.ids[s], seed)).items() if m.any()]
    assert oracle["pairs"] == len(regions) >= 4
    assert oracle["pointing_game"] == 1.0  # the map's maximum is the region
    assert oracle["mean_lift"] == pytest.approx(np.mean([1 / m.mean() for *_, m in regions]))  # all mass inside
    assert set(oracle["per_disease"]) == {n for _, _, n, _ in regions}
    uniform = phantom_localisation(_FakeRun(test, views, seed, "uniform"), test, test.ref_labels, views, seed, "gradcam", 8)
    assert uniform["pointing_game"] == 0.0 and uniform["mean_lift"] == pytest.approx(1.0)  # chance


def test_summary_prints_the_one_compact_table():
    scores = {"BLEU_1": 0.5, "BLEU_4": 0.1, "METEOR": 0.2, "ROUGE_L": 0.3, "CIDEr": 0.4,
              "ce": {"precision": 0.6, "recall": 0.7, "f1": 0.65}}
    result = {"phantom_images": True, "n_test": 9, "model": scores, "baselines": {"most_frequent": scores},
              "ci95": {"model": {"BLEU_4": {"lo": 0.08, "hi": 0.14}, "ce": {"f1": {"lo": 0.6, "hi": 0.7}}}},
              "ce_convention": {"headline": "macro", "labels": "all14", "uncertain_as": "negative"},
              "ci_method": {"resamples": 10}, "classifier_test": {"mean_auroc": 0.5}, "warning": "collapse"}
    text = summary(result, "artifacts/eval/report.html")
    assert text.startswith("PHANTOM IMAGES, 9 test studies")
    assert "0.100 [0.080, 0.140]" in text and "0.650 [0.600, 0.700]" in text and "most_frequent" in text
    assert "WARNING: collapse" in text and "report.html" in text


def test_pick_samples_half_with_findings():
    labels = np.full((10, 14), np.nan, np.float32)
    labels[:, CHEXPERT_14.index("No Finding")] = 1
    labels[[1, 4, 7], CHEXPERT_14.index("Edema")] = 1
    labels[8, CHEXPERT_14.index("Edema")] = -1  # uncertain is not a finding
    rows = pick_samples(labels, 4, seed=0)
    assert len(rows) == 4 and list(rows) == sorted(rows)
    assert len(set(rows) & {1, 4, 7}) == 2


def test_selection_rule():
    assert Selection.of("val_loss") == Selection("val_loss", "min")
    assert Selection.of("val_bleu4").mode == Selection.of("val_auroc").mode == "max"
    lo, hi = Selection.of("val_loss"), Selection.of("val_bleu4")
    assert lo.better(0.1, 0.2) and not lo.better(0.2, 0.2) and hi.better(0.3, 0.2) and lo.better(5.0, None)
    with pytest.raises(ValueError):
        Selection("val_loss", "lowest")


def _scores(texts_by_system, ref_labels, label_by_text):
    from amrg.evaluation import Scores, SystemScores

    systems = {}
    for name, texts in texts_by_system.items():
        labels = np.stack([label_by_text[t] for t in texts])
        systems[name] = SystemScores(texts, {"ce": {"f1": 0.0}}, labels, None)
    return Scores(systems, None, {})


def test_template_guard_counts_distinct_reports_vocabulary_and_prevalence():
    from amrg.evaluation import template_guard

    e, c = CHEXPERT_14.index("Edema"), CHEXPERT_14.index("Cardiomegaly")
    lab = {"a b .": np.full(14, np.nan), "a c d .": np.full(14, np.nan)}
    lab["a c d ."][e] = 1
    lab["a c d ."][c] = -1
    ref = np.full((4, 14), np.nan)
    ref[:2, e] = 1
    scores = _scores({"model": ["a b .", "a c d .", "a c d .", "a c d ."], "most_frequent": ["a b ."] * 4}, ref, lab)
    g = template_guard(scores, ref, "negative")
    assert g["model"]["distinct_ratio"] == 0.5 and g["most_frequent"]["distinct_ratio"] == 0.25
    assert g["model"]["vocabulary"] == 5 and g["most_frequent"]["vocabulary"] == 3  # a b c d .  /  a b .
    assert g["model"]["prevalence"]["Edema"] == {"predicted": 0.75, "reference": 0.5}
    assert g["model"]["prevalence"]["Cardiomegaly"]["predicted"] == 0.0  # uncertain counts as negative
    assert template_guard(scores, ref, "positive")["model"]["prevalence"]["Cardiomegaly"]["predicted"] == 0.75


def test_collapse_warning_uses_the_paired_interval():
    from amrg.evaluation import Scores, SystemScores, collapse_warning

    s = {n: SystemScores(["x"], {"ce": {"f1": 0.1}}, np.zeros((1, 14)), None) for n in ("model", "most_frequent")}
    guard = {"model": {"distinct_ratio": 1.0}}
    beats = {"paired": {"most_frequent": {"ce": {"f1": {"diff": 0.05, "lo": 0.01, "hi": 0.09}}}}}
    ties = {"paired": {"most_frequent": {"ce": {"f1": {"diff": 0.01, "lo": -0.02, "hi": 0.04}}}}}
    assert collapse_warning(Scores(s, beats, {}), guard) is None
    assert "does not beat the most-frequent report on CE F1" in collapse_warning(Scores(s, ties, {}), guard)
    assert "distinct" in collapse_warning(Scores(s, beats, {}), {"model": {"distinct_ratio": 0.05}})


def test_reference_truncation_to_llm_tokens():
    from amrg.evaluation import truncate_references
    from amrg.models.llm import train_word_tokenizer

    tok = train_word_tokenizer(["the heart is normal . the lungs are clear ."], 1)
    refs = ["the heart is normal . the lungs are clear .", "the lungs ."]
    assert truncate_references(refs, tok, 0) == refs
    assert truncate_references(refs, tok, 3) == ["the heart is", "the lungs ."]


def test_every_headline_metric_has_provenance():
    from amrg.config import Labels
    from amrg.evaluation import labeler_provenance
    from amrg.metrics import registry

    prov = registry.provenance({"pycocoevalcap": "1.2"}, {"labeler": labeler_provenance(Labels())})
    assert prov["BLEU_4"] == {"paper_name": "BLEU-4", "direction": "higher is better", "computed_by": "pycocoevalcap 1.2"}
    assert set(registry.HEADLINE) <= set(prov) and all(prov[k]["direction"] for k in registry.HEADLINE)
    assert prov["labeler"]["labeler"] == "rules"


def test_metrics_json_carries_the_headline_paired_differences_and_the_prevalences():
    from amrg.evaluation import compact_guard, headline_differences

    boot = {"paired": {"nearest_neighbour": {"BLEU_4": {"diff": 0.01, "lo": -0.002, "hi": 0.02, "p_le_0": 0.1},
                                             "ce": {"f1": {"diff": 0.031234, "lo": 0.01, "hi": 0.05, "p_le_0": 0.0}}}}}
    d = headline_differences(boot)["nearest_neighbour"]
    assert d["ce.f1"] == {"diff": 0.0312, "lo": 0.01, "hi": 0.05, "p_le_0": 0.0}
    assert d["BLEU_4"]["lo"] == -0.002 and "CIDEr" not in d  # absent metrics are left out, not invented
    assert headline_differences(None) is None
    g = compact_guard({"distinct_ratio": 0.5, "vocabulary": 9,
                       "prevalence": {"Edema": {"predicted": 0.75, "reference": 0.5}}})
    assert g == {"distinct_ratio": 0.5, "vocabulary": 9, "prevalence": {"Edema": [0.75, 0.5]}}
