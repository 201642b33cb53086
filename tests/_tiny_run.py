"""A complete trained run of random tiny models, built in seconds: what ``amrg generate``, its batch mode and
``amrg serve`` are tested on (tests/test_cli.py, test_batch_generate.py, test_serve.py)."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from amrg.config import BankIndex, Cam, Decode, Evaluate, Hopfield, Labels, Llm, Runtime, to_dict
from amrg.io import save_tensors, write_json, write_parquet
from amrg.labels.schema import CHEXPERT_14
from amrg.layout import Layout
from amrg.models.classifier import ClassifierSpec, DiseaseClassifier
from amrg.models.generator import GeneratorSpec, create_generator
from amrg.models.llm import save_llm

ROOT = Path(__file__).resolve().parents[1]
CARDIO = CHEXPERT_14.index("Cardiomegaly")
PROMPT = "Generate a report ."
RUN_DECODE = Decode(num_beams=1, max_new_tokens=3, min_new_tokens=3)
BANK_SENTENCES = ["the heart is enlarged", "cardiomegaly is present", "the lungs are clear", "no pneumothorax",
                  "mild pulmonary edema", "small left effusion", "no focal consolidation", "stable mediastinum"]


def build_tiny_run(root: Path) -> Path:
    """A complete artifacts/ layout of a tiny run in ``root``: classifier (biased towards Cardiomegaly), both
    banks (the report bank with its sentences), generator, preprocess stats, the evaluate stage's params."""
    torch.manual_seed(0)
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    spec = ClassifierSpec(p["vision"]["name"], dict(p["vision"]["kwargs"]), 224, 32, 1, 4)
    clf = DiseaseClassifier(spec)
    with torch.no_grad():  # p(Cardiomegaly) ~ 1, everything else ~ 0, whatever the image
        clf.head_weight.mul_(0.01)
        clf.head_bias.fill_(-6.0)
        clf.head_bias[CARDIO] = 6.0
    layout = Layout(root)
    save_tensors(layout.classifier_weights, clf.state_dict())
    write_json(layout.classifier_config, {"spec": spec.to_dict(), "uncertain_as": "negative"})
    banks = torch.randn(10, clf.encoder.num_features), torch.randn(8, 24)
    save_tensors(layout.visual_bank, {"bank": banks[0]})
    save_tensors(layout.report_bank, {"bank": banks[1]})
    write_parquet(layout.stage_dir("encode_report_bank") / "rows.parquet",
                  {"sentence": BANK_SENTENCES, "study_id": [f"s{i}" for i in range(8)], "disease": [CARDIO] * 8,
                   "count": [1] * 8})
    llm_cfg = Llm(source="scratch", trainable="full", hidden_size=32, layers=1, heads=2, intermediate_size=64,
                  min_word_freq=1)
    gspec = GeneratorSpec(llm_cfg, Hopfield(dim=16), BankIndex(), PROMPT, 4, clf.encoder.num_features, 32)
    gen = create_generator(gspec, *banks, train_texts=["the heart is enlarged .", "the lungs are clear ."])
    with torch.no_grad():
        gen.proj_query[1].bias.add_(1.0)  # a trained value, not the initial one: the round trip must carry it
    save_tensors(layout.generator_weights, gen.trainable_state_dict())
    save_llm(layout.stage_dir("train_generator"), llm_cfg, gen.llm, gen.tokenizer)
    write_json(layout.generator_config, {"spec": gspec.to_dict()})
    write_json(layout.stats, {"phantom_images": True, "studies": {"train": 2, "val": 1, "test": 1}})
    # the run's own decode/CAM settings, as its evaluate stage resolves them
    write_json(layout.params("evaluate"), {"decode": to_dict(RUN_DECODE), "evaluate": to_dict(Evaluate()),
                                           "labels": to_dict(Labels()), "cam": to_dict(Cam()), "runtime": to_dict(Runtime())})
    return root
