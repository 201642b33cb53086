"""CAM mining rules (paper eq. 1 + IV-E, IV-B's cap; the released code's top-6 and random.sample):
``patch_mask``'s top-k patches, ``select_regions``' confident / random cap after dropping empty masks,
the ``mine_cam`` stage against "mine every candidate, drop empty masks, cap", and the rule each
artifact records (regions.parquet schema metadata, metrics.json, the visual bank)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from amrg.banks import read_region_rule, region_order, select_regions, with_region_rule
from amrg.cam import CamMiner, apply_mask, patch_mask
from amrg.config import Cam
from amrg.labels.schema import CHEXPERT_14
from amrg.layout import Layout
from amrg.models.classifier import DiseaseClassifier

from .test_cam import default_spec, write_phantom_preprocess

ROOT = Path(__file__).resolve().parents[1]
IDX = {n: i for i, n in enumerate(CHEXPERT_14)}


# --- eq. 1 + IV-E: top-k patches ---------------------------------------------------------------------
def _map(means: np.ndarray, patch: int) -> np.ndarray:
    """A ``(B, h*patch, w*patch)`` map whose ``patch`` blocks have exactly ``means``."""
    return np.repeat(np.repeat(np.asarray(means, np.float32), patch, axis=1), patch, axis=2)


def test_patch_mask_top_k_by_hand():
    means = np.array([[[0.9, 0.2, 0.7],
                       [0.6, 0.8, 0.1],
                       [0.3, 0.7, 0.95]],
                      [[0.1, 0.6, 0.2],   # only two patches above tau 0.5: fewer than k
                       [0.0, 0.3, 0.55],
                       [0.2, 0.1, 0.4]]])
    cam = _map(means, 4)
    above = means > 0.5
    np.testing.assert_array_equal(patch_mask(cam, 4, 0.5), above)      # k = 0: eq. 1 as is
    np.testing.assert_array_equal(patch_mask(cam, 4, 0.5, 0), above)
    top3 = patch_mask(cam, 4, 0.5, 3)
    want0 = np.zeros((3, 3), bool)
    want0[0, 0] = want0[1, 1] = want0[2, 2] = True  # 0.95, 0.9, 0.8
    np.testing.assert_array_equal(top3[0], want0)
    np.testing.assert_array_equal(top3[1], above[1])  # fewer than k above tau: all of them, no more
    top1 = patch_mask(cam, 4, 0.5, 1)
    assert top1[0].sum() == 1 and top1[0, 2, 2] and top1[1].sum() == 1 and top1[1, 0, 1]
    for k in (6, 9, 50):  # k >= the patches above tau (here 6 and 2): the plain eq. 1 mask
        np.testing.assert_array_equal(patch_mask(cam, 4, 0.5, k), above)
    assert not patch_mask(cam, 4, 0.99, 2).any()  # nothing above tau: empty, whatever k


def test_patch_mask_top_k_ties_are_row_major_and_tau_is_strict():
    means = np.array([[[0.7, 0.2, 0.7],
                       [0.5, 0.7, 0.2],
                       [0.7, 0.2, 0.8]]])
    cam = _map(means, 2)
    m = patch_mask(cam, 2, 0.5, 3)  # 0.8, then three tied at 0.7: the first two in row-major order
    want = np.zeros((1, 3, 3), bool)
    want[0, 2, 2] = want[0, 0, 0] = want[0, 0, 2] = True
    np.testing.assert_array_equal(m, want)
    m = patch_mask(cam, 2, 0.5, 4)
    want[0, 1, 1] = True
    np.testing.assert_array_equal(m, want)
    np.testing.assert_array_equal(patch_mask(cam, 2, 0.5, 6), means > 0.5)  # 0.5 itself is not > tau
    # mirrored (0.8 first, then 0.7 at (0, 2), (1, 1), (2, 0), (2, 2)): the tie goes to the first in row-major order
    np.testing.assert_array_equal(patch_mask(cam[:, ::-1, ::-1].copy(), 2, 0.5, 2)[0],
                                  np.array([[1, 0, 1], [0, 0, 0], [0, 0, 0]], bool))
    # the block mean, not the pixel maximum, ranks the patches: one hot pixel does not make a patch
    spiky = _map(np.array([[[0.6, 0.7]]]), 2)
    spiky[0, 0, 0], spiky[0, 0, 1] = 1.0, 0.2  # patch (0, 0): max 1.0, mean (1.0 + 0.2 + 0.6 + 0.6) / 4 = 0.6
    np.testing.assert_array_equal(patch_mask(spiky, 2, 0.5, 1)[0], [[False, True]])
    with pytest.raises(ValueError, match="max_patches"):
        patch_mask(cam, 2, 0.5, -1)


def test_cam_config_validates_max_patches_and_select():
    assert Cam().max_patches == 0 and Cam().select == "confident"  # defaults: today's rule
    assert any("max_patches" in e for e in Cam(max_patches=-1).check())
    assert Cam(max_patches=6, select="random").check() == []
    from amrg.config import parse_params
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert raw["cam"]["max_patches"] == 0 and raw["cam"]["select"] == "confident"
    assert parse_params({"cam": {"max_patches": 6, "select": "random"}}).cam == Cam(max_patches=6, select="random")
    with pytest.raises(Exception, match="cam.select: 'best'"):
        parse_params({"cam": {"select": "best"}})
    with pytest.raises(Exception, match="cam.max_patches must be >= 0"):
        parse_params({"cam": {"max_patches": -2}})


# --- the per-disease cap ------------------------------------------------------------------------------
SCORES = np.array([0.1, 0.9, 0.5, 0.7, 0.2, 0.8, 0.5, 0.3])
DISEASES = np.array([0, 0, 0, 1, 1, 0, 0, 1])


def test_select_regions_confident_by_hand():
    assert select_regions(SCORES, DISEASES, 2).tolist() == [1, 3, 5, 7]
    assert select_regions(SCORES, DISEASES, 3, "confident").tolist() == [1, 2, 3, 4, 5, 7]  # tie 0.5: first row
    assert select_regions(SCORES, DISEASES, 10).tolist() == list(range(8))
    # the cap counts after dropping: rows 1 and 3 are empty masks, so the next ones take their places
    eligible = np.ones(8, bool)
    eligible[[1, 3]] = False
    assert select_regions(SCORES, DISEASES, 2, eligible=eligible).tolist() == [2, 4, 5, 7]
    # ... which is the cap run on the eligible rows alone
    sub = np.flatnonzero(eligible)
    assert sub[select_regions(SCORES[sub], DISEASES[sub], 2)].tolist() == [2, 4, 5, 7]
    assert region_order(SCORES, DISEASES).tolist() == [1, 5, 2, 6, 0, 3, 7, 4]
    assert select_regions(np.zeros(0), np.zeros(0, int), 3).tolist() == []
    with pytest.raises(ValueError, match="cam.select"):
        select_regions(SCORES, DISEASES, 2, "best")


def test_select_regions_random_is_seeded_capped_and_uniform_after_dropping():
    a = select_regions(SCORES, DISEASES, 2, "random", seed=3)
    assert a.tolist() == select_regions(SCORES, DISEASES, 2, "random", seed=3).tolist()  # reproducible
    assert np.bincount(DISEASES[a]).tolist() == [2, 2]
    draws = {tuple(select_regions(SCORES, DISEASES, 2, "random", seed=s)) for s in range(20)}
    assert len(draws) > 5  # the seed matters
    # the score plays no part: reversing the scores leaves every draw as it is
    assert all(select_regions(SCORES, DISEASES, 2, "random", seed=s).tolist()
               == select_regions(1 - SCORES, DISEASES, 2, "random", seed=s).tolist() for s in range(20))

    eligible = np.ones(8, bool)
    eligible[[1, 3, 6]] = False
    n, counts = 3000, np.zeros(8)
    for s in range(n):
        full = region_order(SCORES, DISEASES, "random", s)
        kept = select_regions(SCORES, DISEASES, 2, "random", s, eligible)
        # the cap after dropping: the first 2 eligible rows of each disease in the seed's order
        want = [r for d in (0, 1) for r in [r for r in full if DISEASES[r] == d and eligible[r]][:2]]
        assert kept.tolist() == sorted(want)
        counts[kept] += 1
    assert (counts[~eligible] == 0).all()
    # disease 0 keeps 2 of its 3 eligible rows (0, 2, 5), disease 1 both of its 2 (4, 7): a uniform sample
    np.testing.assert_allclose(counts[[0, 2, 5]] / n, 2 / 3, atol=0.04)
    assert (counts[[4, 7]] == n).all()


def test_region_rule_metadata_round_trip(tmp_path):
    import pyarrow as pa

    from amrg.data.store import read_patch_mask, with_patch_mask
    from amrg.io import read_parquet, write_parquet

    rule = {"method": "gradcam", "tau": 0.75, "max_patches": 6, "select": "random", "seed": 3, "max_per_disease": 500}
    t = with_patch_mask(pa.table({"study_id": ["a", "b"]}), np.ones((2, 2, 2), bool), 8)
    write_parquet(tmp_path / "r.parquet", with_region_rule(t, rule))
    back = read_parquet(tmp_path / "r.parquet")
    assert read_region_rule(back) == rule and read_region_rule(back.select(["study_id"])) == rule
    assert read_patch_mask(back)[1] == 8  # the patch geometry is still there
    with pytest.raises(ValueError, match="rerun"):
        read_region_rule(t)


# --- the stage: mine in cap order and stop == mine all, drop empty, cap -------------------------------
TRAIN = [("s0", ["No Finding"]), ("s1", ["Cardiomegaly", "Pleural Effusion"]), ("s2", ["Pleural Effusion"]),
         ("s3", ["Cardiomegaly"]), ("s4", ["Pleural Effusion", "Lung Opacity"]), ("s5", ["Pleural Effusion"]),
         ("s6", ["Pleural Effusion", "Cardiomegaly"]), ("s7", ["Pleural Effusion"]), ("s8", ["Cardiomegaly"])]
HELD = [("v0", ["Cardiomegaly"]), ("t0", ["Pleural Effusion"])]
SIZE = 112  # 7 x 7 patches of 16 px and tokens: one Swin window


def lab(*names):
    x = np.full(len(CHEXPERT_14), np.nan, dtype=np.float32)
    for n in names:
        x[IDX[n]] = 1.0
    return x


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: on shared cores two threads are many times slower than one for these tiny maps."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, one_thread):
    """A preprocess + classifier output for TRAIN/HELD phantoms, and every candidate's CAM computed alone."""
    from amrg.io import save_tensors, write_json
    from amrg.models.classifier import predict_proba

    root = tmp_path_factory.mktemp("ws")
    layout = Layout(root / "artifacts")
    studies = [(s, n, "train") for s, n in TRAIN] + [(HELD[0][0], HELD[0][1], "val"), (HELD[1][0], HELD[1][1], "test")]
    labels = np.stack([lab(*n) for _, n, _ in studies])
    ids, views, splits, pix = write_phantom_preprocess(layout, studies, labels, SIZE, 20)
    torch.manual_seed(5)
    model = DiseaseClassifier(default_spec(SIZE)).eval()
    save_tensors(layout.classifier_weights, model.state_dict())
    write_json(layout.classifier_config, {"spec": default_spec(SIZE).to_dict(), "uncertain_as": "negative"})

    # every candidate (train image, positive label), in the stage's order (np.nonzero: image, then disease)
    train = [k for k, sp in enumerate(splits) if sp == "train"]
    cands = [(k, IDX[n]) for k in train for n in sorted(dict(TRAIN)[ids[k]], key=IDX.get)]
    probs = predict_proba(model, torch.from_numpy(pix), train, torch.device("cpu"), "fp32", 4)
    scores = np.array([probs[train.index(k), d] for k, d in cands])
    miner = CamMiner(model, "gradcam")
    try:
        cams = np.concatenate([miner(torch.from_numpy(pix[k:k + 1]), [d]) for k, d in cands])
    finally:
        miner.close()
    return {"root": root, "layout": layout, "ids": ids, "views": views, "pix": pix, "cands": cands,
            "scores": scores, "cams": cams}


class _OneByOne:
    """CamMiner that maps each image alone (as the reference does), so that batching cannot move a patch
    mean across tau; counts the CAMs it computes."""

    calls = 0

    def __init__(self, model, method, backend="library", precision="fp32"):
        self.miner = CamMiner(model, method, backend, precision)

    def __call__(self, pixels, diseases):
        _OneByOne.calls += len(diseases)
        return np.concatenate([self.miner(pixels[j:j + 1], [d]) for j, d in enumerate(diseases)])

    def close(self):
        self.miner.close()


def _run_stage(ws, monkeypatch, visual: dict | None = None, **cam):
    """Stage mine_cam on the workspace with these ``cam`` keys (and ``banks.visual`` for a later
    encode_visual_bank); returns regions.parquet, metrics.json and how many CAMs were computed."""
    from amrg.io import read_json, read_parquet
    from stages import mine_cam

    params = {"cam": dict(method="gradcam", batch_size=3, n_overlays=1, targets="labels", **cam),
              "runtime": dict(device="cpu", precision="fp32", seed=11, num_threads=1), "data": {"image_size": SIZE},
              "banks": {"visual": visual or {"batch_size": 4}}}  # the rest: the embedded defaults
    path = ws["root"] / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    monkeypatch.setattr(mine_cam, "CamMiner", _OneByOne)
    _OneByOne.calls = 0
    mine_cam.main(["--params", str(path), "--artifacts", str(ws["layout"].root)])
    layout = ws["layout"]
    return read_parquet(layout.regions), read_json(layout.stage_dir("mine_cam") / "metrics.json"), _OneByOne.calls


def _tau_with_empty_masks(ws) -> float:
    """A tau between two per-candidate maxima of the block means, so that about a third of the masks are empty."""
    side = SIZE // 16
    top = np.sort(ws["cams"].reshape(len(ws["cams"]), side, 16, side, 16).mean(axis=(2, 4)).reshape(len(ws["cams"]), -1)
                  .max(1))
    k = len(top) // 3
    assert top[k] - top[k - 1] > 1e-3, "no clear gap between the block-mean maxima at the chosen quantile"
    return float((top[k - 1] + top[k]) / 2)


@pytest.mark.parametrize("select,max_patches", [("confident", 0), ("random", 3)])
def test_mine_cam_caps_after_dropping_empty_masks(workspace, monkeypatch, select, max_patches):
    from amrg.data.store import read_patch_mask

    ws, cap = workspace, 3
    tau = _tau_with_empty_masks(ws)
    cands, diseases = ws["cands"], np.array([d for _, d in ws["cands"]])
    masks = patch_mask(ws["cams"], 16, tau, max_patches)
    nonempty = masks.any(axis=(1, 2))
    want = select_regions(ws["scores"], diseases, cap, select, 11, eligible=nonempty)  # mine all, drop empty, cap
    before = select_regions(ws["scores"], diseases, cap, select, 11)  # today's cap before the CAMs
    assert (~nonempty[before]).any() and (nonempty & ~np.isin(np.arange(len(cands)), before)).any(), \
        "the fixture must have an empty mask among the first candidates of a disease that has more"
    assert not np.array_equal(want, before[nonempty[before]])  # the new rule keeps other regions than the old one

    t, metrics, calls = _run_stage(ws, monkeypatch, tau=tau, max_patches=max_patches, select=select,
                                   max_per_disease=cap)
    got = [(r["study_id"], r["view"], r["disease"]) for r in t.select(["study_id", "view", "disease"]).to_pylist()]
    assert got == [(ws["ids"][cands[i][0]], ws["views"][cands[i][0]], cands[i][1]) for i in want]
    stored, _ = read_patch_mask(t)
    np.testing.assert_array_equal(stored, masks[want])
    pixels = np.stack([np.frombuffer(b, np.uint8).reshape(SIZE, SIZE) for b in t.column("pixels").to_pylist()])
    np.testing.assert_array_equal(pixels, apply_mask(ws["pix"][[cands[i][0] for i in want]], masks[want], 16))
    np.testing.assert_allclose(t.column("score").to_numpy(), ws["scores"][want], atol=1e-5)
    if max_patches:
        assert (t.column("n_patches").to_numpy() <= max_patches).all()

    # bounded compute: the CAMs are the first candidates of each disease in the cap's order up to its cap-th
    # non-empty one (all of them when there are fewer), never more
    order = region_order(ws["scores"], diseases, select, 11)
    per = metrics["per_disease"]
    mined = empty = 0
    for d in np.unique(diseases):
        rows = order[diseases[order] == d]
        hits = np.cumsum(nonempty[rows])
        prefix = rows[:int(np.searchsorted(hits, cap)) + 1] if hits[-1] >= cap else rows
        n = CHEXPERT_14[d]
        assert per[n] == {"candidates": len(rows), "mined": len(prefix), "empty_masks": int((~nonempty[prefix]).sum()),
                          "regions": min(cap, int(nonempty[rows].sum()))}
        mined, empty = mined + len(prefix), empty + int((~nonempty[prefix]).sum())
    assert calls == metrics["mined"] == mined < len(cands)
    assert metrics["regions"] == len(want) and metrics["empty_masks"] == empty
    # the rule is in the file and in metrics.json
    rule = {"method": "gradcam", "targets": "labels", "patch": 16, "tau": tau, "max_patches": max_patches,
            "max_per_disease": cap, "select": select, "seed": 11 if select == "random" else None}
    assert read_region_rule(t) == rule
    assert {k: metrics[k] for k in rule} == rule


def test_visual_bank_says_which_rule_made_it(workspace, monkeypatch):
    from safetensors import safe_open

    from amrg.io import read_json, read_parquet
    from stages import encode_visual_bank

    ws = workspace
    t, metrics, _ = _run_stage(ws, monkeypatch, tau=0.3, max_patches=2, select="confident", max_per_disease=4)
    encode_visual_bank.main(["--params", str(ws["root"] / "params.yaml"), "--artifacts", str(ws["layout"].root)])
    rule = read_region_rule(t)
    assert rule["max_patches"] == 2 and rule["tau"] == 0.3 and rule["select"] == "confident"
    with safe_open(str(ws["layout"].visual_bank), "pt") as f:
        assert json.loads(f.metadata()["cam_rule"]) == rule and f.metadata()["unit"] == "region"
        assert f.get_tensor("bank").shape[0] == t.num_rows
    out = ws["layout"].stage_dir("encode_visual_bank")
    assert read_json(out / "metrics.json")["cam_rule"] == rule
    assert read_region_rule(read_parquet(out / "rows.parquet")) == rule


def test_mine_cam_with_every_mask_empty_mines_every_candidate_once(workspace, monkeypatch):
    ws, side = workspace, SIZE // 16
    top = float(ws["cams"].reshape(-1, side, 16, side, 16).mean(axis=(2, 4)).max())
    assert top < 0.99
    t, metrics, calls = _run_stage(ws, monkeypatch, tau=0.99, max_patches=0, select="confident", max_per_disease=1)
    assert t.num_rows == metrics["regions"] == 0 and read_region_rule(t)["tau"] == 0.99
    assert calls == metrics["mined"] == metrics["empty_masks"] == len(ws["cands"])  # no candidate mined twice


# --- banks.visual.unit: patch (the released code's bank: one row per kept patch crop) -----------------
def test_patch_crops_are_the_released_codes_cv2_resize():
    cv2 = pytest.importorskip("cv2")  # pytorch-grad-cam's dependency
    from amrg.banks import patch_crops

    rng = np.random.default_rng(0)
    pix = rng.integers(0, 256, (2, 48, 48), dtype=np.uint8)
    rows, cols = torch.tensor([1, 2]), torch.tensor([0, 1])
    got = patch_crops(torch.from_numpy(pix), rows, cols, 16)
    assert got.shape == (2, 48, 48) and got.dtype == torch.float32
    for i, (r, c) in enumerate([(1, 0), (2, 1)]):
        crop = pix[i, 16 * r:16 * r + 16, 16 * c:16 * c + 16].astype(np.float32)
        np.testing.assert_allclose(got[i].numpy(), cv2.resize(crop, (48, 48)), atol=1e-2)  # INTER_LINEAR
    flat = np.full((1, 32, 32), 7, np.uint8)
    flat[0, :16, 16:] = 200
    out = patch_crops(torch.from_numpy(flat), torch.tensor([0]), torch.tensor([1]), 16)
    assert torch.equal(out, torch.full((1, 32, 32), 200.0))  # the crop of patch (0, 1) only


def test_visual_bank_unit_patch_encodes_each_kept_patch_alone(workspace, monkeypatch):
    from safetensors import safe_open

    from amrg.banks import patch_crops
    from amrg.data.store import pixels_of, read_patch_mask
    from amrg.io import read_json, read_parquet
    from amrg.models.load import load_classifier
    from stages import encode_visual_bank

    ws = workspace
    t, _, _ = _run_stage(ws, monkeypatch, tau=0.3, max_patches=3, select="random", max_per_disease=2,
                         visual={"unit": "patch", "batch_size": 4})
    encode_visual_bank.main(["--params", str(ws["root"] / "params.yaml"), "--artifacts", str(ws["layout"].root)])
    masks, _ = read_patch_mask(t)
    out = ws["layout"].stage_dir("encode_visual_bank")
    rows = read_parquet(out / "rows.parquet")
    with safe_open(str(ws["layout"].visual_bank), "pt") as f:
        bank, meta = f.get_tensor("bank"), f.metadata()
    assert meta["unit"] == "patch" and json.loads(meta["cam_rule"]) == read_region_rule(t)
    assert len(bank) == rows.num_rows == int(masks.sum()) == int(t.column("n_patches").to_numpy().sum())
    r = rows.to_pydict()
    assert all(masks[g, y, x] for g, y, x in zip(r["region"], r["patch_row"], r["patch_col"]))
    assert len(set(zip(r["region"], r["patch_row"], r["patch_col"]))) == len(bank)  # each kept patch once
    assert r["study_id"] == [t.column("study_id")[g].as_py() for g in r["region"]]
    assert read_json(out / "metrics.json")["regions"] == t.num_rows
    encoder = load_classifier(ws["layout"].stage_dir("train_classifier"), torch.device("cpu")).encoder
    pix = torch.from_numpy(np.array(pixels_of(t)))
    for k in (0, len(bank) - 1):  # a row is its patch crop encoded alone, all tokens averaged
        g, y, x = r["region"][k], r["patch_row"][k], r["patch_col"][k]
        with torch.inference_mode():
            want = encoder(patch_crops(pix[[g]], torch.tensor([y]), torch.tensor([x]), 16)).mean(1)[0]
        torch.testing.assert_close(bank[k], want, atol=1e-4, rtol=1e-4)
