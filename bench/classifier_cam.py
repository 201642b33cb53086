"""Bench: stage-1 classifier training and CAM mining throughput, and CAM localisation on phantoms.

1. Training throughput (images/s) of the full DiseaseClassifier step (uint8 in, BCE + orthogonality
   loss, backward, AdamW step) against the bare timm model's forward + backward on the same batch
   (float input, loss = sum of ``forward_features``), and their ratio. A third row adds an AdamW step
   to the bare model, to split the gap into optimizer and Q-Former/head/normalisation.
2. CAM mining throughput (images/s): :class:`amrg.cam.CamMiner` on batches (one target disease per
   image) against the same bare timm forward + backward; ratio.
   All variants run in one interleaved loop (the order rotates every repeat) after warm-up; each
   figure is the median over repeats. Nothing is asserted about time.
3. With a finished pipeline (``--artifacts``, default ``artifacts`` if it exists) whose images are
   phantoms: per-disease CAM localisation of the trained classifier on the TEST split, against
   :func:`amrg.data.phantoms.phantom_regions` redrawn with the preprocess stage's seeds
   (:func:`amrg.data.phantoms.phantom_seed`, view = image view % 2). A few images are redrawn first and
   must equal the stored bytes. Per disease: (image, disease) pairs with label 1, mean region area,
   mean lift (CAM mass in region / area; 1 = chance), the lift of a disease-agnostic spatial prior
   (the view's mean CAM over all pairs) in the same regions, hit rate (lift > 1), pointing game
   (tolerance 0 and ``--tolerance`` px).

Usage::

    python bench/classifier_cam.py                                    # tiny preset of params.yaml, CPU
    python bench/classifier_cam.py --vision swin_base_patch4_window7_224 --kwargs '{}' --batch 8
    python bench/classifier_cam.py --device cuda --precision bf16 --batch 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amrg.cam import CAM_METHODS, CamMiner, cam_hit, pointing_game  # noqa: E402
from amrg.io import autocast  # noqa: E402
from amrg.labels.schema import CHEXPERT_14  # noqa: E402
from amrg.models.classifier import ClassifierSpec, DiseaseClassifier  # noqa: E402


def parse_args(argv=None):
    import yaml

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml", help="defaults for the model (vision, qformer, data)")
    ap.add_argument("--vision", default=None, help="timm model name (default: params vision.name)")
    ap.add_argument("--kwargs", default=None, help="JSON timm kwargs (default: params vision.kwargs)")
    ap.add_argument("--image-size", type=int, default=None, help="default: params data.image_size")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16 autocast, CUDA only")
    ap.add_argument("--method", default="gradcam", choices=sorted(CAM_METHODS))
    ap.add_argument("--warmup", type=int, default=2, help="warm-up steps per variant")
    ap.add_argument("--repeats", type=int, default=7, help="timed repeats per variant (median reported)")
    ap.add_argument("--iters", type=int, default=3, help="steps per timed repeat")
    ap.add_argument("--artifacts", default=None, help="finished pipeline's artifacts/ (default: artifacts if present)")
    ap.add_argument("--no-localisation", action="store_true")
    ap.add_argument("--tolerance", type=float, default=15.0, help="pointing-game tolerance in pixels")
    a = ap.parse_args(argv)
    p = yaml.safe_load(Path(a.params).read_text()) if Path(a.params).exists() else {}
    v, q = p.get("vision", {}), p.get("qformer", {})
    a.vision = a.vision or v.get("name", "swin_tiny_patch4_window7_224")
    a.kwargs = json.loads(a.kwargs) if a.kwargs is not None else dict(v.get("kwargs") or {})
    a.image_size = a.image_size or p.get("data", {}).get("image_size", 224)
    a.qformer = (q.get("dim", 64), q.get("layers", 1), q.get("heads", 4), q.get("n_queries", 14))
    a.ortho_weight = p.get("classifier", {}).get("ortho_weight", 0.1)
    return a


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def bare_timm(name: str, img_size: int, kwargs: dict) -> torch.nn.Module:
    import timm

    try:
        return timm.create_model(name, pretrained=False, num_classes=0, img_size=img_size, **kwargs)
    except TypeError:  # families without img_size (CNNs), as in amrg.models.vision
        return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)


def interleaved(variants: dict, batch: int, warmup: int, repeats: int, iters: int, device: torch.device) -> dict:
    """images/s per variant: median over ``repeats`` of ``iters`` calls, variants interleaved (rotating)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    sync()
    names, rates = list(variants), {n: [] for n in variants}
    for r in range(repeats):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            for _ in range(iters):
                variants[n]()
            sync()
            rates[n].append(batch * iters / (time.perf_counter() - t))
    return {n: statistics.median(v) for n, v in rates.items()}


def throughput(a, device: torch.device) -> None:
    torch.manual_seed(0)
    spec = ClassifierSpec(a.vision, a.kwargs, a.image_size, *a.qformer)
    model = DiseaseClassifier(spec).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    bare = bare_timm(a.vision, a.image_size, a.kwargs).to(device)
    bare_opt = torch.optim.AdamW(bare.parameters(), lr=1e-3, weight_decay=0.05)
    b, s = a.batch, a.image_size
    pixels = torch.randint(0, 256, (b, s, s), dtype=torch.uint8, device=device)
    targets = (torch.rand(b, spec.n_queries, device=device) < 0.2).float()
    x = torch.randn(b, 3, s, s, device=device)
    diseases = [int(d) for d in torch.randint(1, spec.n_queries, (b,))]

    def full_step():
        model.train()
        with autocast(device, a.precision):
            logits = model(pixels).float()
        loss = model.loss(logits, targets, a.ortho_weight)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def bare_fwd_bwd():
        bare.train()
        with autocast(device, a.precision):
            loss = bare.forward_features(x).float().sum()
        bare.zero_grad(set_to_none=True)
        loss.backward()

    def bare_fwd_bwd_adamw():
        bare_fwd_bwd()
        bare_opt.step()

    miner = CamMiner(model, a.method)

    def cam_batch():
        model.eval()
        with autocast(device, a.precision):
            miner(pixels, diseases)

    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    n_bare = sum(p.numel() for p in bare.parameters()) / 1e6
    print(f"model: {a.vision} kwargs={json.dumps(a.kwargs)} image={s} grid={model.encoder.grid} "
          f"qformer(dim,layers,heads,queries)={a.qformer}  params: classifier {n_params:.2f}M, timm {n_bare:.2f}M")
    print(f"device={device} precision={a.precision} threads={torch.get_num_threads()} batch={b} "
          f"warmup={a.warmup} repeats={a.repeats} x {a.iters} steps (median images/s)")
    r = interleaved({"classifier train step": full_step, "timm fwd+bwd": bare_fwd_bwd,
                     "timm fwd+bwd+AdamW": bare_fwd_bwd_adamw, f"CamMiner {a.method}": cam_batch},
                    b, a.warmup, a.repeats, a.iters, device)
    miner.close()
    base = r["timm fwd+bwd"]
    print("\n| measurement | images/s | ratio to timm fwd+bwd |\n|---|---:|---:|")
    for n, v in r.items():
        print(f"| {n} | {v:.1f} | {v / base:.2f} |")


def localisation(a, device: torch.device, art: Path) -> None:
    from amrg.data.phantoms import draw_phantom, phantom_regions, phantom_seed
    from amrg.data.store import load_images, load_studies, pack_masks, unpack_masks
    from amrg.io import read_json
    from amrg.models.load import load_classifier

    pre, cls = art / "preprocess", art / "classifier"
    stats = read_json(pre / "stats.json")
    if not stats.get("phantom_images", False):
        print(f"\n{art}: images are not phantoms; no drawn regions to score against")
        return
    pp = read_json(pre / "params.json") if (pre / "params.json").exists() else None
    if pp is None:
        import yaml

        pp = yaml.safe_load(Path(a.params).read_text())
    seed0, size = int(pp["runtime"]["seed"]), int(pp["data"]["image_size"])
    studies, images = load_studies(pre / "studies.parquet"), load_images(pre / "images.parquet", pre / "pixels.npy")
    model = load_classifier(cls, device)
    idx = studies.index()
    test = np.flatnonzero(images.split == "test")

    def seed_of(sid: str) -> int:
        return phantom_seed(sid, seed0)

    for r in test[:: max(1, len(test) // 4)][:4]:  # the regions are only valid if the images redraw exactly
        sid = images.study_ids[r]
        again = draw_phantom(studies.labels[idx[sid]], int(images.views[r]) % 2, size, seed_of(sid))
        if not np.array_equal(again, images.pixels[r]):
            raise SystemExit(f"redrawing {sid} view {images.views[r]} does not reproduce the stored image: "
                             "the phantom seeds or drawing code differ from the preprocess run")

    pairs = [(r, j) for r in test for j in range(1, len(CHEXPERT_14))
             if studies.labels[idx[images.study_ids[r]], j] == 1]
    miner = CamMiner(model, a.method)
    per: dict[int, list] = {}
    kept: list[tuple[int, int, np.ndarray]] = []  # (disease, view, packed region) for the prior baseline
    prior_sum, prior_n = np.zeros((2, size, size)), np.zeros(2)
    empty = 0
    t0 = time.perf_counter()
    for s in range(0, len(pairs), a.batch):
        chunk = pairs[s:s + a.batch]
        rows = [r for r, _ in chunk]
        with autocast(device, a.precision):
            cams = miner(torch.from_numpy(np.array(images.pixels[rows])).to(device), [j for _, j in chunk])
        for (r, j), cam in zip(chunk, cams):
            sid = images.study_ids[r]
            region = phantom_regions(studies.labels[idx[sid]], int(images.views[r]) % 2, size, seed_of(sid))
            region = region.get(CHEXPERT_14[j])
            if region is None or not region.any():
                empty += 1
                continue
            h = cam_hit(cam, region)
            view = int(images.views[r]) % 2
            prior_sum[view] += cam
            prior_n[view] += 1
            kept.append((j, view, pack_masks(region[None])[0]))
            per.setdefault(j, []).append((h["area"], h["lift"], h["hit"], pointing_game(cam, region),
                                          pointing_game(cam, region, a.tolerance)))
    miner.close()
    # spatial-prior baseline: the mean CAM of the view over ALL scored pairs (every disease), scored
    # against each region. A disease whose lift beats this is localised beyond "where CAMs usually are".
    prior = prior_sum / np.maximum(prior_n, 1)[:, None, None]
    prior_lift: dict[int, list] = {}
    for j, view, packed in kept:
        region = unpack_masks(packed[None], size)[0]
        prior_lift.setdefault(j, []).append(cam_hit(prior[view], region)["lift"])
    secs = time.perf_counter() - t0
    print(f"\nlocalisation: {art} test split, {len(test)} images, classifier {cls}, cam.method={a.method}, "
          f"{len(pairs)} (image, disease) pairs with label 1 ({empty} with an empty drawn region skipped), "
          f"{secs:.0f}s incl. redrawing regions")
    print(f"\n| disease | pairs | region area | mean lift | prior lift | hit rate (lift > 1) | pointing | "
          f"pointing ±{a.tolerance:g}px |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    rows_all, prior_all = [], []
    for j, v in sorted(per.items()):
        m, pl = np.asarray(v, dtype=float), np.asarray(prior_lift[j])
        rows_all.append(m), prior_all.append(pl)
        print(f"| {CHEXPERT_14[j]} | {len(m)} | {m[:, 0].mean():.3f} | {m[:, 1].mean():.2f} | {pl.mean():.2f} | "
              f"{m[:, 2].mean():.2f} | {m[:, 3].mean():.2f} | {m[:, 4].mean():.2f} |")
    if rows_all:
        m, pl = np.concatenate(rows_all), np.concatenate(prior_all)
        print(f"| all pairs | {len(m)} | {m[:, 0].mean():.3f} | {m[:, 1].mean():.2f} | {pl.mean():.2f} | "
              f"{m[:, 2].mean():.2f} | {m[:, 3].mean():.2f} | {m[:, 4].mean():.2f} |")
    print("\nlift = (CAM mass in the drawn region) / (region area); 1 = a uniform map. prior lift: the same for the "
          "mean CAM of that view over all pairs of every disease (a disease-agnostic spatial prior).")


def main(argv=None) -> None:
    a = parse_args(argv)
    device = pick_device(a.device)
    throughput(a, device)
    if a.no_localisation:
        return
    art = Path(a.artifacts) if a.artifacts else Path("artifacts")
    needed = [art / "preprocess" / "images.parquet", art / "preprocess" / "studies.parquet",
              art / "classifier" / "model.safetensors"]
    if all(p.exists() for p in needed):
        localisation(a, device, art)
    elif a.artifacts:
        raise SystemExit(f"{art} lacks {[str(p) for p in needed if not p.exists()]}")
    else:
        print("\nno finished pipeline in artifacts/: localisation skipped")


if __name__ == "__main__":
    main()
