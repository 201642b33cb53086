"""Stage train_generator (paper III-C/D, eq. 2-10, 12): Hopfield memories + LLM, autoregressive loss.

Stage-1 features of every training/validation study are computed once (frozen classifier). The
trainable parts (visual/query projections, V-/R-Hopfield projections θ_v, θ_r, LoRA adapters when
``llm.trainable = lora``, the whole LM when ``full``) are fitted on the report tokens (eq. 12). Every
epoch is validated by the loss and by BLEU-4 of greedy val reports; ``generator.select`` picks the
epoch kept. Only trainable weights are written (plus the scratch LM's tokenizer and config), so a
frozen 7B LM adds nothing to the output. ``runtime.num_processes > 1`` runs the stage data-parallel
under torchrun (:mod:`amrg.dist`); it runs as is under ``torchrun``/``accelerate launch`` too.
"""

from __future__ import annotations

import resource

import torch

from amrg import dist
from amrg.config import Decode, to_dict
from amrg.data.store import load_images, load_studies
from amrg.inference import load_banks
from amrg.io import autocast, save_tensors, setup_runtime, write_json
from amrg.metrics import nlg_scores
from amrg.models.features import N_VIEWS, study_features
from amrg.models.generator import ReportGenerator
from amrg.models.llm import build_llm, save_llm_spec
from amrg.models.load import load_classifier
from amrg.train import LoopConfig, fit

from .common import ARTIFACTS, CHECKPOINTS, Timer, fingerprint, is_phantom, log_history, start, write_resolved

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


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on a GPU, max resident set size on CPU."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


def main(argv: list[str] | None = None) -> None:
    params, log = start("train_generator", argv)
    dist.relaunch(params.runtime.num_processes, "stages.train_generator", argv)
    g, timer = params.generator, Timer()
    device = setup_runtime(params.runtime)
    ctx = dist.context()
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
    val_reports = [studies.reports[i] for i in val]
    frozen_bf16 = params.runtime.precision == "bf16" and device.type == "cuda" and params.llm.trainable != "full"
    llm, tokenizer = build_llm(params.llm, train_reports, g.prompt, torch.bfloat16 if frozen_bf16 else torch.float32)
    visual_bank, report_bank = load_banks(params.hopfield, ARTIFACTS)
    index = to_dict(params.banks.index)
    model = ReportGenerator(llm, tokenizer, feats["train"][0].shape[-1], feats["train"][1].shape[-1],
                            visual_bank, report_bank, params.hopfield, g.prompt, index).to(device)
    ids = {"train": tokenize_reports(tokenizer, train_reports, g.max_report_tokens),
           "val": tokenize_reports(tokenizer, val_reports, g.max_report_tokens)}

    def loss_on(net: torch.nn.Module, split: str, b: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Mean loss over the report tokens of rows ``b`` and how many tokens that is."""
        (f, fd), (tok, mask) = feats[split], ids[split]
        width = int(mask[b].sum(1).max())
        with autocast(device, params.runtime.precision):
            loss = net(f[b].to(device), fd[b].to(device), tok[b, :width].to(device), mask[b, :width].to(device)).float()
        return loss, int(mask[b].sum())

    greedy = Decode(num_beams=1, max_new_tokens=g.max_report_tokens, min_new_tokens=1)

    @torch.no_grad()
    def validate() -> dict[str, float]:
        model.eval()
        total, n_tokens, hyps = 0.0, 0, []
        for b in torch.arange(len(val)).split(g.batch_size):
            loss, n = loss_on(model, "val", b)
            total, n_tokens = total + float(loss) * n, n_tokens + n
            with autocast(device, params.runtime.precision):
                hyps += model.generate(feats["val"][0][b].to(device), feats["val"][1][b].to(device), greedy)
        return {"val_loss": total / max(n_tokens, 1), "val_bleu4": nlg_scores(val_reports, hyps, meteor=False)["BLEU_4"]}

    loop = LoopConfig(g.epochs, g.batch_size, g.lr, g.weight_decay, g.warmup_steps, g.grad_accum,
                      g.checkpoint_every, params.runtime.seed)
    fp = fingerprint(params.generator, params.llm, params.hopfield, params.banks.index, params.runtime,
                     PRE / "studies.parquet", CLS / "model.safetensors", BANKS / "visual" / "bank.safetensors",
                     BANKS / "report" / "bank.safetensors")
    fit_timer = Timer()
    best, history = fit(model, len(train), lambda net, b: loss_on(net, "train", b), validate, loop,
                        CHECKPOINTS / "train_generator" / "state.pt", fp, select=g.select,
                        mode="min" if g.select == "val_loss" else "max")
    fit_seconds, seconds = fit_timer(), timer()
    if not ctx.is_main:
        dist.shutdown()
        return
    save_tensors(OUT / "weights.safetensors", best)
    save_llm_spec(OUT, params.llm, llm, tokenizer)
    write_json(OUT / "config.json", {"llm": to_dict(params.llm), "hopfield": to_dict(params.hopfield),
                                     "index": index, "prompt": g.prompt, "visual_pool": g.visual_pool,
                                     "visual_dim": feats["train"][0].shape[-1],
                                     "query_dim": feats["train"][1].shape[-1]})
    n_trainable = sum(v.numel() for v in best.values())
    chosen = max(history, key=lambda h: h[g.select]) if g.select == "val_bleu4" else min(history, key=lambda h: h["val_loss"])
    write_json(OUT / "metrics.json", {
        "phantom_images": is_phantom(), "select": g.select, "best_epoch": chosen["epoch"],
        "best_val_loss": chosen["val_loss"], "best_val_bleu4": chosen["val_bleu4"],
        "epochs": len(history), "trainable_parameters": n_trainable, "processes": ctx.world,
        "train_samples_per_s": round(len(train) * len(history) / fit_seconds, 1),  # incl. validation
        "peak_memory_mb": peak_memory_mb(device), "seconds": seconds})
    log_history(OUT, history)
    write_resolved(OUT, generator=g, llm=params.llm, hopfield=params.hopfield, banks_index=params.banks.index,
                   runtime=params.runtime)
    log.info("generator: kept epoch %d (%s), val loss %.4f, %d trainable parameters, %.0fs", chosen["epoch"],
             g.select, chosen["val_loss"], n_trainable, seconds)
    dist.shutdown()


if __name__ == "__main__":
    main()
