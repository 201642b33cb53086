"""CAM mining (paper III-B, eq. 1): every CAM method, the localisation scores, the regions.parquet round
trip through the real ``mine_cam`` stage, and GradCAM localisation on phantoms against the drawn regions."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from amrg.cam import CAM_METHODS, CamMiner, apply_mask, cam_hit, patch_mask, pointing_game
from amrg.data.phantoms import draw_phantom, phantom_regions
from amrg.labels.schema import CHEXPERT_14
from amrg.layout import Layout
from amrg.models.classifier import ClassifierSpec, DiseaseClassifier

ROOT = Path(__file__).resolve().parents[1]
IDX = {n: i for i, n in enumerate(CHEXPERT_14)}


def lab(*names, val=1.0):
    x = np.full(len(CHEXPERT_14), np.nan, dtype=np.float32)
    for n in names:
        x[IDX[n]] = val
    return x


def default_spec(size: int = 224) -> ClassifierSpec:
    """The embedded default's tiny preset (params.yaml vision + qformer)."""
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    q = p["qformer"]
    return ClassifierSpec(p["vision"]["name"], dict(p["vision"]["kwargs"]), size, q["dim"], q["layers"], q["heads"],
                          q["n_queries"])


# --- every method ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = DiseaseClassifier(default_spec(224)).eval()
    imgs = np.stack([draw_phantom(lab("Cardiomegaly", "Pleural Effusion"), 0, 224, 3),
                     draw_phantom(lab("Pleural Effusion"), 1, 224, 4)])
    return model, torch.from_numpy(imgs)


@pytest.mark.parametrize("method", sorted(CAM_METHODS))
def test_every_cam_method_maps_a_batch_with_per_image_targets(tiny, method):
    model, x = tiny
    assert model.encoder.grid == (14, 14)
    miner = CamMiner(model, method)
    try:
        cams = miner(x, [IDX["Cardiomegaly"], IDX["Pleural Effusion"]])
        alone = miner(x[1:], [IDX["Pleural Effusion"]])
    finally:
        miner.close()
    assert cams.shape == (2, 224, 224) and np.isfinite(cams).all()
    assert cams.min() >= 0.0 and cams.max() <= 1.0 + 1e-6
    assert cams.reshape(2, -1).max(1).min() > 0.5  # min-max normalised, not blank
    # the second image's map is the one for ITS target, whatever else is in the batch
    np.testing.assert_allclose(cams[1], alone[0], atol=1e-4)


def test_unknown_method_is_refused(tiny):
    with pytest.raises(ValueError, match="unknown cam.method"):
        CamMiner(tiny[0], "gradcam+++")


# --- localisation scores on hand-made maps ----------------------------------------------------------
def test_cam_hit_known_answers():
    region = np.zeros((10, 10), bool)
    region[:, :2] = True  # area 0.2
    uniform = cam_hit(np.full((10, 10), 0.7), region)
    assert uniform["area"] == pytest.approx(0.2) and uniform["mass_in"] == pytest.approx(0.2)
    assert uniform["lift"] == pytest.approx(1.0) and uniform["hit"] is False  # chance is not a hit

    inside = np.zeros((10, 10))
    inside[3:6, 0] = 1.0
    r = cam_hit(inside, region)
    assert r["mass_in"] == pytest.approx(1.0) and r["lift"] == pytest.approx(5.0) and r["hit"] is True

    split = np.zeros((10, 10))
    split[:, 1] = 1.0  # inside
    split[:, 5] = 3.0  # outside, three times the weight
    r = cam_hit(split, region)
    assert r["mass_in"] == pytest.approx(0.25) and r["lift"] == pytest.approx(1.25) and r["hit"] is True
    r = cam_hit(split, ~region)
    assert r["mass_in"] == pytest.approx(0.75) and r["lift"] == pytest.approx(0.75 / 0.8) and r["hit"] is False

    blank = cam_hit(np.zeros((10, 10)), region)
    assert blank == {"mass_in": 0.0, "area": pytest.approx(0.2), "lift": 0.0, "hit": False}


def test_cam_hit_rejects_bad_input():
    region = np.ones((4, 4), bool)
    with pytest.raises(ValueError, match="same"):
        cam_hit(np.ones((4, 5)), region)
    with pytest.raises(ValueError, match="same"):
        cam_hit(np.ones((1, 4, 4)), region)
    with pytest.raises(ValueError, match="empty"):
        cam_hit(np.ones((4, 4)), ~region)
    with pytest.raises(ValueError, match="non-negative"):
        cam_hit(-np.ones((4, 4)), region)
    with pytest.raises(ValueError, match="finite"):
        pointing_game(np.full((4, 4), np.nan), region)


def test_pointing_game_known_answers():
    region = np.zeros((20, 20), bool)
    region[2:5, 2:5] = True
    cam = np.zeros((20, 20))
    cam[3, 3] = 1.0
    assert pointing_game(cam, region)
    cam = np.zeros((20, 20))
    cam[12, 4] = 1.0  # 8 px below the region's last row (4)
    assert not pointing_game(cam, region)
    assert pointing_game(cam, region, tolerance=8.0) and not pointing_game(cam, region, tolerance=7.9)
    assert not pointing_game(np.full((20, 20), 0.3), region)  # constant map: no maximum
    plateau = np.zeros((20, 20))
    plateau[3:5, 4:6] = 1.0  # 2 x 2 tie (bilinear upsampling): column 4 inside, column 5 outside -> half in
    assert pointing_game(plateau, region)
    plateau[3, 4] = 0.0      # now 1 of 3 maximal pixels inside
    assert not pointing_game(plateau, region)
    assert cam_hit(plateau, region)["lift"] > 1  # a miss for the pointing game can still beat chance


# --- regions.parquet: the real stage on a tiny preprocess + classifier ---------------------------------
TRAIN = [("s0", ["No Finding"]), ("s1", ["Cardiomegaly", "Pleural Effusion"]), ("s2", ["Pleural Effusion"]),
         ("s3", ["Cardiomegaly"]), ("s4", ["Pleural Effusion", "Lung Opacity"]), ("s5", ["Pleural Effusion"])]
HELD = [("v0", ["Cardiomegaly"]), ("t0", ["Pleural Effusion"])]


def write_phantom_preprocess(layout, studies, labels, size: int, seed0: int):
    """preprocess's outputs for ``studies`` [(id, names, split)] with phantom views drawn from ``labels``
    (seed ``seed0 + i``): studies.parquet, the image index and the pixel store. Returns (ids, views, splits, pixels) per image."""
    from amrg.data.store import images_table
    from amrg.io import write_parquet
    from amrg.labels.schema import LABEL_COLUMNS, TARGET_COLUMNS

    ids, views, splits, pix = [], [], [], []
    for i, (s, _, split) in enumerate(studies):
        for v in (0, 1):
            ids.append(s), views.append(v), splits.append(split), pix.append(draw_phantom(labels[i], v, size, seed0 + i))
    pix = np.stack(pix)
    table = {"id": [s for s, _, _ in studies], "split": [sp for _, _, sp in studies], "report": ["r"] * len(studies),
             "findings": ["r"] * len(studies), "impression": [""] * len(studies), "n_images": [2] * len(studies)}
    table.update({c: labels[:, j] for cols in (LABEL_COLUMNS, TARGET_COLUMNS) for j, c in enumerate(cols)})
    write_parquet(layout.studies, table)
    write_parquet(layout.images, images_table(ids, views, splits, pix).drop(["pixels"]))  # preprocess's index
    np.save(layout.pixels, pix)  # and its pixel store
    return ids, views, splits, pix


def test_mine_cam_stage_regions_round_trip(tmp_path):
    from amrg.data.store import read_patch_mask
    from amrg.io import read_json, read_parquet, save_tensors, write_json
    from amrg.models.classifier import predict_proba
    from amrg.models.load import load_classifier
    from stages import mine_cam

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["cam"].update(method="gradcam", tau=0.3, max_per_disease=3, batch_size=2, n_overlays=1, targets="labels")
    params["runtime"].update(device="cpu", precision="fp32")
    size, patch = params["data"]["image_size"], params["cam"]["patch"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    layout = Layout(tmp_path / "artifacts")

    studies = [(s, n, "train") for s, n in TRAIN] + [(HELD[0][0], HELD[0][1], "val"), (HELD[1][0], HELD[1][1], "test")]
    labels = np.stack([lab(*n) for _, n, _ in studies])
    labels[2, IDX["Cardiomegaly"]] = -1  # uncertain, binarised negative: never a target
    ids, views, splits, pix = write_phantom_preprocess(layout, studies, labels, size, 10)
    torch.manual_seed(1)
    spec = default_spec(size)
    save_tensors(layout.classifier_weights, DiseaseClassifier(spec).state_dict())
    write_json(layout.classifier_config, {"spec": spec.to_dict(), "uncertain_as": "negative"})

    mine_cam.main(["--params", str(tmp_path / "params.yaml"), "--artifacts", str(layout.root)])

    t = read_parquet(layout.regions)
    assert set(t.column_names) == {"study_id", "view", "pixels", "disease", "disease_name", "score", "patch_mask",
                                   "n_patches"}
    rows = t.to_pylist()
    metrics = read_json(layout.stage_dir("mine_cam") / "metrics.json")
    masks, stored_patch = read_patch_mask(t)
    assert stored_patch == patch and masks.shape[1:] == (size // patch, size // patch)  # the file carries its geometry
    # targets: the label positives of TRAIN images (2 views each), capped at 3 per disease by score
    expect = {}
    for s, names in TRAIN:
        for n in names:
            expect[IDX[n]] = expect.get(IDX[n], 0) + 2
    for d, n in expect.items():
        per = metrics["per_disease"][CHEXPERT_14[d]]
        # the cap counts non-empty regions: every mined candidate is a region or an empty mask
        assert per["candidates"] == n and per["regions"] + per["empty_masks"] == per["mined"]
        assert per["regions"] == min(n - per["empty_masks"], 3)
    assert len(rows) == metrics["regions"] > 0

    model = load_classifier(layout.stage_dir("train_classifier"), torch.device("cpu"))
    miner = CamMiner(model, "gradcam")
    side = size // patch
    row_of = {(s, v): k for k, (s, v) in enumerate(zip(ids, views))}
    study_of = {s: i for i, (s, _, _) in enumerate(studies)}
    for r, mask in zip(rows, masks):
        k = row_of[(r["study_id"], r["view"])]
        assert splits[k] == "train" and labels[study_of[r["study_id"]], r["disease"]] == 1
        assert r["disease_name"] == CHEXPERT_14[r["disease"]]
        assert mask.sum() == r["n_patches"] > 0
        stored = np.frombuffer(r["pixels"], np.uint8).reshape(size, size)
        np.testing.assert_array_equal(stored, apply_mask(pix[k:k + 1], mask[None], patch)[0])  # eq. 1 pixels
        # the mask is eq. 1 of this classifier's GradCAM (patches within 1e-4 of tau may flip with batching)
        cam = miner(torch.from_numpy(pix[k:k + 1]), [r["disease"]])
        means = cam.reshape(side, patch, side, patch).mean(axis=(1, 3))
        sure = np.abs(means - params["cam"]["tau"]) > 1e-4
        np.testing.assert_array_equal(mask[sure], patch_mask(cam, patch, params["cam"]["tau"])[0][sure])
        p = predict_proba(model, torch.from_numpy(pix), [k], torch.device("cpu"), "fp32", 1)[0, r["disease"]]
        assert r["score"] == pytest.approx(p, abs=1e-5)
    miner.close()
    # the cap keeps the highest-scoring candidates: every kept score >= every dropped one of that disease
    for d in expect:
        kept = {(r["study_id"], r["view"]) for r in rows if r["disease"] == d}
        if expect[d] > 3 and kept:
            cand = [(s, v) for s, names in TRAIN if CHEXPERT_14[d] in names for v in (0, 1)]
            probs = predict_proba(model, torch.from_numpy(pix), [row_of[c] for c in cand], torch.device("cpu"),
                                  "fp32", 8)[:, d]
            kept_p = [p for c, p in zip(cand, probs) if c in kept]
            dropped_p = [p for c, p in zip(cand, probs) if c not in kept]
            assert min(kept_p) >= max(dropped_p) - 1e-6
    assert list((layout.stage_dir("mine_cam") / "overlays").glob("*.png"))


# --- localisation on phantoms -----------------------------------------------------------------------
# A tiny classifier learns Pleural Effusion against normal phantoms (frontal), then GradCAM for it on
# held-out positives must put more of its mass inside phantom_regions(...)["Pleural Effusion"] than a
# uniform map would (lift > 1), and more than inside the same region mirrored top-bottom. It is a
# statistical claim, so it is asserted on the median over several (model seed, data seed) pairs, not on
# one picked pair. 128 px (8 x 8 tokens), 150 pairs, 10 epochs, one thread: ~5-14 s per seed pair on 2
# cores (idle to shared), so marked slow. Swin window 2 keeps tokens local, as window 7 on the
# default's 14 x 14 grid does at 224 px: with window >= 4 every token sees the whole image, and
# GradCAM's per-channel weights then light up look-alike tissue (the abdomen, as bright as the fluid).
# Measured when this recipe was set, pairs (s, s) for s = 0..9: mean lift 2.66 2.12 1.87 2.62 1.00 2.07
# 2.24 1.66 1.79 2.58 (9 of 10 above 1.5; median 2.1), held-out AUROC >= 0.96 throughout; mirrored
# control 0.03-0.96; the same numbers with one thread or two. Smaller recipes were weaker (96 px:
# lift 0.85-1.01; 100 pairs, 8 epochs: 1.17-1.86).
# Cardiomegaly is not asserted: an earlier recipe failed 2 of 6 pairs (lift 0.68; lift 1.02 below the
# mirrored control's 1.51); GradCAM covers the whole heart and mediastinum, while the drawn region is
# the ring the heart grew by.
LOCALISATION_SEEDS = (0, 1, 2, 3, 4)


def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
    return float(((pos[:, None] > neg[None]) + 0.5 * (pos[:, None] == neg[None])).mean())


def localisation(disease: str, n_train: int, seed: int = 0, size: int = 128, epochs: int = 10, n_test: int = 20,
                 data: int = 0):
    """Train normal-vs-``disease`` on phantoms; return held-out AUROC, GradCAM lifts in the drawn
    region, and lifts in the region mirrored top-bottom (control)."""
    d = IDX[disease]

    def make(n, base):
        x, y, meta = [], [], []
        for k in range(n):
            for j, names in enumerate((["No Finding"], [disease])):
                labels = lab(*names)
                x.append(draw_phantom(labels, 0, size, base + 2 * k + j))
                y.append(np.nan_to_num(labels)), meta.append((labels, base + 2 * k + j))
        return torch.from_numpy(np.stack(x)), torch.from_numpy(np.stack(y)), meta

    xtr, ytr, _ = make(n_train, 1000 + 10_000 * data)
    xte, yte, meta = make(n_test, 900_000 + 10_000 * data)
    torch.manual_seed(seed)
    spec = ClassifierSpec("swin_tiny_patch4_window7_224",
                          dict(patch_size=16, embed_dim=64, depths=[2], num_heads=[2], window_size=2), size, 64, 1, 4)
    model = DiseaseClassifier(spec)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    steps = epochs * -(-len(xtr) // 32)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for b in torch.randperm(len(xtr), generator=g).split(32):
            loss = model.loss(model(xtr[b]), ytr[b], 0.1)[0]
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        p = torch.sigmoid(model(xte))[:, d].numpy()
    pos = np.flatnonzero(yte[:, d].numpy() == 1)
    auc = _auc(p[pos], p[yte[:, d].numpy() == 0])
    miner = CamMiner(model, "gradcam")
    cams = miner(xte[pos], [d] * len(pos))
    miner.close()
    regions = [phantom_regions(meta[i][0], 0, size, meta[i][1])[disease] for i in pos]
    lifts = np.array([cam_hit(c, r)["lift"] for c, r in zip(cams, regions)])
    control = np.array([cam_hit(c, np.flipud(r))["lift"] for c, r in zip(cams, regions)])
    return auc, lifts, control


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gradcam_localises_pleural_effusion_on_phantoms():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on shared cores two threads are several times slower than one
    try:
        runs = [localisation("Pleural Effusion", 150, seed=s, data=s) for s in LOCALISATION_SEEDS]
    finally:
        torch.set_num_threads(threads)
    aucs = np.array([auc for auc, _, _ in runs])
    lifts = np.array([lift.mean() for _, lift, _ in runs])
    control = np.array([c.mean() for _, _, c in runs])
    summary = f"AUROC {np.round(aucs, 2)}, lift {np.round(lifts, 2)}, mirrored {np.round(control, 2)}"
    assert aucs.min() >= 0.8, f"the tiny classifier did not learn Pleural Effusion on every seed: {summary}"
    assert np.median(lifts) > 1.5, f"GradCAM mass in the drawn effusion is not well above chance: {summary}"
    assert np.median(lifts) > np.median(control) + 0.5, f"no better than the mirrored region: {summary}"
    assert (lifts > control).sum() >= len(runs) - 1, summary
    print(summary)
