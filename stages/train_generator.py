"""Stage train_generator (paper III-C/D, eq. 2-10, 12): Hopfield memories + LLM, autoregressive loss.

Stage-1 features of every training/validation study are computed once (frozen classifier). The
trainable parts (visual/query projections, V-/R-Hopfield projections θ_v, θ_r, and the LLM only when
``llm.trainable = full``) are fitted on the report tokens; the epoch with the lowest validation loss
is kept. Only trainable weights are written (plus the scratch LM's tokenizer and config).
"""

from __future__ import annotations

import torch

from amrg.data.store import load_images, load_studies
from amrg.config import to_dict
from amrg.io import autocast, save_tensors, setup_runtime, write_json
from amrg.models.features import N_VIEWS, study_features
from amrg.models.generator import ReportGenerator
from amrg.models.llm import build_llm, save_llm_spec
from amrg.models.load import load_classifier
from amrg.train import LoopConfig, fit

from .common import ARTIFACTS, CHECKPOINTS, Timer, fingerprint, is_phantom, load_banks, log_history, start, write_resolved

PRE, CLS, BANKS, OUT = ARTIFACTS / "preprocess", ARTIFACTS / "classifier", ARTIFACTS / "banks", ARTIFACTS / "generator"


def tokenize_reports(tokenizer, reports: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Report token ids + EOS, right-padded: ``(N, L)`` ids and attention mask."""
    ids = tokenizer(reports, add_special_tokens=False, truncation=True, max_length=max_tokens - 1)["input_ids"]
    ids = [x + [tokenizer.eos_token_id] for x in ids]
    width = max(len(x) for x in ids)
    out = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        out[i, : len(x)], mask[i, : len(x)] = torch.tensor(x), 1
    return out, mask


def main(argv: list[str] | None = None) -> None:
    params, log = start("train_generator", argv)
    g, timer = params.generator, Timer()
    device = setup_runtime(params.runtime)
    studies, images = load_studies(PRE / "studies.parquet"), load_images(PRE / "images.parquet")
    train, val = studies.rows("train"), studies.rows("val")
    classifier = load_classifier(CLS, device)
    pixels = torch.from_numpy(images.pixels.copy())
    feats = {}
    for name, rows in (("train", train), ("val", val)):
        view_rows = images.study_views([studies.ids[i] for i in rows], N_VIEWS)
        feats[name] = study_features(classifier, pixels, view_rows, g.visual_pool, device, params.runtime.precision)
    del classifier, pixels

    train_reports = [studies.reports[i] for i in train]
    llm, tokenizer = build_llm(params.llm, train_reports, g.prompt)
    visual_bank, report_bank = load_banks(params.hopfield)
    model = ReportGenerator(llm, tokenizer, feats["train"][0].shape[-1], feats["train"][1].shape[-1],
                            visual_bank, report_bank, params.hopfield, g.prompt).to(device)
    ids = {"train": tokenize_reports(tokenizer, train_reports, g.max_report_tokens),
           "val": tokenize_reports(tokenizer, [studies.reports[i] for i in val], g.max_report_tokens)}

    def loss_on(split: str, b: torch.Tensor) -> torch.Tensor:
        (f, fd), (tok, mask) = feats[split], ids[split]
        width = int(mask[b].sum(1).max())
        with autocast(device, params.runtime.precision):
            return model(f[b].to(device), fd[b].to(device), tok[b, :width].to(device), mask[b, :width].to(device)).float()

    @torch.no_grad()
    def validate() -> dict[str, float]:
        model.eval()
        losses = [loss_on("val", b) * len(b) for b in torch.arange(len(val)).split(g.batch_size)]
        return {"val_loss": float(sum(losses) / max(len(val), 1))}

    loop = LoopConfig(g.epochs, g.batch_size, g.lr, g.weight_decay, g.warmup_steps, g.grad_accum,
                      g.checkpoint_every, params.runtime.seed)
    fp = fingerprint(params.generator, params.llm, params.hopfield, params.runtime, PRE / "studies.parquet",
                     CLS / "model.safetensors", BANKS / "visual" / "bank.safetensors", BANKS / "report" / "bank.safetensors")
    best, history = fit(model, len(train), lambda b: loss_on("train", b), validate, loop,
                        CHECKPOINTS / "train_generator" / "state.pt", fp)
    seconds = timer()
    save_tensors(OUT / "weights.safetensors", best)
    save_llm_spec(OUT, params.llm, llm, tokenizer)
    write_json(OUT / "config.json", {"llm": to_dict(params.llm),
                                     "hopfield": to_dict(params.hopfield), "prompt": g.prompt,
                                     "visual_pool": g.visual_pool, "visual_dim": feats["train"][0].shape[-1],
                                     "query_dim": feats["train"][1].shape[-1]})
    n_trainable = sum(v.numel() for v in best.values())
    write_json(OUT / "metrics.json", {"phantom_images": is_phantom(), "best_val_loss": min(h["val_loss"] for h in history),
                                      "epochs": len(history), "trainable_parameters": n_trainable,
                                      "train_samples_per_s": round(len(train) * len(history) / seconds, 1)})
    log_history(OUT, history)
    write_resolved(OUT, generator=g, llm=params.llm, hopfield=params.hopfield, runtime=params.runtime)
    log.info("generator: best val loss %.4f, %d trainable parameters, %.0fs", min(h["val_loss"] for h in history),
             n_trainable, seconds)


if __name__ == "__main__":
    main()
