"""Stage encode_report_bank (paper III-C): the report memory R (n_r x D), training split only.

Draws ``banks.report.size`` training reports per disease in proportion to the training label
frequencies (seeded), splits them into sentences, keeps each distinct sentence once and encodes it
with ``banks.report.encoder`` (paper: Bio_ClinicalBERT; Table VIII: decoder LMs too), pooled by
``banks.report.pooling`` (mean, last or cls token; :mod:`amrg.models.text_encoder`); the weights are bf16
on CUDA when ``runtime.precision`` is bf16. Validation and test reports are never read into the bank.
"""

from __future__ import annotations

import numpy as np
import torch

from amrg.banks import sample_reports_by_disease, sentence_rows
from amrg.data.store import load_studies
from amrg.io import save_tensors, setup_runtime, write_json, write_parquet
from amrg.models.text_encoder import SentenceEncoder

from .common import Timer, start, write_resolved

POOLING_NAMES = {"mean": "attention-masked mean of last hidden states",
                 "last": "last hidden state of the last real token", "cls": "last hidden state of the first token"}


def main(argv: list[str] | None = None) -> None:
    params, log, layout = start("encode_report_bank", argv)
    p, timer, out = params.banks.report, Timer(), layout.stage_dir("encode_report_bank")
    device = setup_runtime(params.runtime)
    studies = load_studies(layout.studies)
    train = studies.rows("train")
    reports = [studies.reports[i] for i in train]
    ids = [studies.ids[i] for i in train]
    positives = (studies.labels[train] == 1).astype(np.int8)
    picks = sample_reports_by_disease(positives, p.size, params.runtime.seed)
    rows = sentence_rows(reports, ids, picks)
    if not rows["sentence"]:
        raise ValueError("report bank is empty: no training report has a positive label")
    dtype = torch.bfloat16 if params.runtime.precision == "bf16" and device.type == "cuda" else torch.float32
    encoder = SentenceEncoder(p.encoder, device, p.max_length, p.pooling, p.trust_remote_code, dtype)
    bank = torch.from_numpy(encoder.encode(rows["sentence"], p.batch_size))
    if not torch.isfinite(bank).all():
        bad = int((~torch.isfinite(bank)).any(1).sum())
        raise FloatingPointError(f"report bank has NaN/inf in {bad} of {len(bank)} rows: check banks.report.encoder")
    save_tensors(layout.report_bank, {"bank": bank}, metadata={"encoder": p.encoder, "pooling": p.pooling})
    write_parquet(out / "rows.parquet", rows)
    write_json(out / "metrics.json", {"n_reports": len(picks), "n_r": int(bank.shape[0]), "dim": int(bank.shape[1]),
                                      "encoder": p.encoder, "pooling": POOLING_NAMES[p.pooling],
                                      "encoder_dtype": str(dtype).removeprefix("torch."),
                                      "sentences_per_s": round(len(bank) / max(timer(), 1e-9), 1)})
    write_resolved(out, banks_report=p, runtime=params.runtime)
    log.info("report bank: %d sentences from %d reports in %.1fs", len(bank), len(picks), timer())


if __name__ == "__main__":
    main()
