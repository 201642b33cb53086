"""Models and the equations they implement, checked against hand computations."""

import math

import numpy as np
import pytest
import torch

from amrg.banks import mask_to_grid, masked_mean_pool, sample_reports_by_disease, select_regions, sentence_rows
from amrg.cam import apply_mask, patch_mask
from amrg.models.classifier import (ClassifierSpec, DiseaseClassifier, classifier_loss,
                                    positive_weights)
from amrg.models.hopfield import HopfieldRetrieval, hopfield_descent, hopfield_energy, hopfield_retrieve
from amrg.models.qformer import orthogonality_loss

TINY = dict(patch_size=16, embed_dim=32, depths=[2], num_heads=[2])


def tiny_classifier(**kw):
    return DiseaseClassifier(ClassifierSpec("swin_tiny_patch4_window7_224", TINY, 224, 32, 1, 4, **kw))


def test_classifier_shapes_grid_and_tokens():
    m = tiny_classifier()
    assert m.encoder.grid == (14, 14)
    x = torch.randint(0, 256, (2, 224, 224), dtype=torch.uint8)
    tokens, fd = m.features(x)
    assert tokens.shape == (2, 196, 32) and fd.shape == (2, 14, 32) and m(x).shape == (2, 14)


FAMILIES = [("swin_tiny_patch4_window7_224", TINY), ("vit_tiny_patch16_224", dict(embed_dim=32, depth=1, num_heads=2)),
            ("resnet18", {})]


@pytest.mark.parametrize("name,kw", FAMILIES[1:])
def test_any_timm_family_gives_tokens(name, kw):
    m = DiseaseClassifier(ClassifierSpec(name, kw, 224, 32, 1, 4))
    tokens, fd = m.features(torch.zeros(1, 224, 224, dtype=torch.uint8))
    gh, gw = m.encoder.grid
    assert tokens.shape == (1, gh * gw, m.encoder.num_features) and fd.shape == (1, 14, 32)


@pytest.mark.parametrize("name,kw", FAMILIES)
def test_token_i_gw_plus_j_is_grid_cell_i_j(name, kw):
    """CAM, mask_to_grid and the visual bank all read token ``i*gw + j`` as grid cell (row i, column j)."""
    from amrg.models.vision import VisionEncoder

    torch.manual_seed(0)
    enc = VisionEncoder(name, img_size=224, **kw).eval()
    x = torch.randint(0, 256, (2, 224, 224), dtype=torch.uint8)
    with torch.no_grad():
        tokens, grid = enc(x), enc.feature_grid(x)
        native = enc.model.forward_features(enc.normalise(x))  # the family's own layout
    gh, gw = enc.grid
    assert grid.shape == (2, enc.num_features, gh, gw) and tokens.shape == (2, gh * gw, enc.num_features)
    for i in range(gh):
        for j in range(gw):
            torch.testing.assert_close(tokens[:, i * gw + j], grid[:, :, i, j])
            if native.ndim == 3:    # ViT (B, prefix + N, C), patches row-major after the prefix tokens
                cell = native[:, enc.num_prefix + i * gw + j]
            elif enc.channels_last:  # Swin (B, H, W, C)
                cell = native[:, i, j]
            else:                    # CNN (B, C, H, W)
                cell = native[:, :, i, j]
            torch.testing.assert_close(grid[:, :, i, j], cell)
    # and row i / column j are image rows / columns: whitening the image patch of cell (1, gw-2) moves the
    # features around that cell (change-weighted centroid within one cell; a transposed grid: (gw-2, 1))
    ph, pw = 224 // gh, 224 // gw
    y = x.clone()
    y[:, ph:2 * ph, (gw - 2) * pw:(gw - 1) * pw] = 255
    with torch.no_grad():
        change = (enc.feature_grid(y) - grid).norm(dim=1).mean(0)
    w = change / change.sum()
    row, col = (w.sum(1) * torch.arange(gh)).sum().item(), (w.sum(0) * torch.arange(gw)).sum().item()
    assert abs(row - 1) < 1 and abs(col - (gw - 2)) < 1, (row, col)


def test_orthogonality_loss_values():
    assert orthogonality_loss(torch.eye(14, 32)).item() == pytest.approx(0.0, abs=1e-7)
    assert orthogonality_loss(torch.ones(14, 32)).item() == pytest.approx(1.0, abs=1e-6)
    q = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # cos = 1/sqrt2 -> two off-diagonal entries of 1/2
    assert orthogonality_loss(q).item() == pytest.approx((0.5 + 0.5) / 2)


# eq. 11 by hand: 2 images x 3 diseases, three queries in 2-d
LOGITS = [[0.5, -1.0, 2.0], [0.0, 1.5, -0.5]]
TARGETS = [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
QUERIES = [[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]


def _bce_by_hand(pos_weight=(1.0, 1.0, 1.0)):
    total = 0.0
    for xs, ys in zip(LOGITS, TARGETS):
        for k, (x, y) in enumerate(zip(xs, ys)):
            sig = 1.0 / (1.0 + math.exp(-x))
            total += -(pos_weight[k] * y * math.log(sig) + (1.0 - y) * math.log(1.0 - sig))
    return total / 6


def test_classifier_loss_is_eq11_by_hand():
    logits, targets, queries = torch.tensor(LOGITS), torch.tensor(TARGETS), torch.tensor(QUERIES)
    # normalised queries (1,0), (1,1)/sqrt2, (0,1): off-diagonal cosines 1/sqrt2, 0, 1/sqrt2 (each twice)
    ortho = 2 * (0.5 + 0.0 + 0.5) / (3 * 2)
    loss, parts = classifier_loss(logits, targets, queries, 0.0)
    assert loss.item() == pytest.approx(_bce_by_hand(), rel=1e-6)
    loss, parts = classifier_loss(logits, targets, queries, 0.1)
    assert parts["bce"] == pytest.approx(_bce_by_hand(), rel=1e-6) and parts["ortho"] == pytest.approx(ortho, rel=1e-6)
    assert loss.item() == pytest.approx(_bce_by_hand() + 0.1 * ortho, rel=1e-6)
    pw = (2.0, 1.0, 0.5)  # scales the positive terms only: (0, 0) x2, (1, 1) x1, (0, 2) x0.5
    loss, parts = classifier_loss(logits, targets, queries, 0.1, torch.tensor(pw))
    assert parts["bce"] == pytest.approx(_bce_by_hand(pw), rel=1e-6)
    assert loss.item() == pytest.approx(_bce_by_hand(pw) + 0.1 * ortho, rel=1e-6)
    assert _bce_by_hand(pw) != pytest.approx(_bce_by_hand())
    # the orthogonality term trains the queries
    q = torch.tensor(QUERIES, requires_grad=True)
    classifier_loss(logits, targets, q, 0.1)[0].backward()
    assert q.grad.abs().sum() > 0


def test_classifier_loss_method_uses_the_models_queries():
    m = tiny_classifier()
    logits, targets = torch.randn(2, 14), torch.randint(0, 2, (2, 14)).float()
    pw = torch.linspace(0.5, 3.0, 14)
    got, parts = m.loss(logits, targets, 0.3, pw)
    want, want_parts = classifier_loss(logits, targets, m.qformer.queries, 0.3, pw)
    assert got.item() == pytest.approx(want.item()) and parts == want_parts
    assert parts["ortho"] == pytest.approx(orthogonality_loss(m.qformer.queries).item())


def test_positive_weights_by_hand():
    targets = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    # n = 4, positives (3, 1, 0): (4-3)/3, (4-1)/1, (4-0)/max(0,1) = 4 -> capped at 3.5
    torch.testing.assert_close(positive_weights(targets, cap=3.5), torch.tensor([1 / 3, 3.0, 3.5]))
    torch.testing.assert_close(positive_weights(targets, cap=100.0), torch.tensor([1 / 3, 3.0, 4.0]))
    torch.testing.assert_close(positive_weights(torch.ones(5, 2), cap=10.0), torch.zeros(2))


def test_hopfield_one_step_is_softmax_retrieval():
    torch.manual_seed(0)
    mem = torch.randn(9, 6)
    h = HopfieldRetrieval(query_dim=5, memory=mem, hidden_dim=4, out_dim=3, beta=4.0, steps=1)
    q = torch.randn(2, 14, 5)
    qp, k, v = h.q_proj(q), h.k_proj(mem), h.v_proj(mem)
    by_hand = torch.softmax(4.0 * (qp @ k.T) / math.sqrt(4), dim=-1) @ v
    torch.testing.assert_close(h(q), by_hand)


def test_hopfield_energy_never_increases():
    torch.manual_seed(1)
    keys, xi0 = torch.randn(50, 8), torch.randn(3, 8)
    energies = [hopfield_energy(hopfield_descent(xi0, keys, 4.0, 0.1, t), xi0, keys, 4.0) for t in range(8)]
    for a, b in zip(energies, energies[1:]):
        assert (b <= a + 1e-6).all()
    assert (energies[-1] < energies[0]).all()


def test_hopfield_large_beta_retrieves_nearest_pattern():
    torch.manual_seed(2)
    keys = torch.nn.functional.normalize(torch.randn(20, 16), dim=-1)
    values = torch.randn(20, 5)
    q = keys[7] + 0.05 * torch.randn(16)
    torch.testing.assert_close(hopfield_retrieve(q[None], keys, values, beta=1e4)[0], values[7])


def test_hopfield_rejects_bad_banks():
    with pytest.raises(ValueError, match="NaN or inf"):
        HopfieldRetrieval(4, torch.tensor([[1.0, float("nan")]]), 4, 4)
    with pytest.raises(ValueError, match="non-empty"):
        HopfieldRetrieval(4, torch.zeros(0, 3), 4, 4)


def test_eq1_patch_mask_keeps_known_patches():
    cam = np.zeros((1, 64, 64), np.float32)
    cam[0, :16, :16] = 0.9            # patch (0,0): mean 0.9 -> kept
    cam[0, 16:32, 16:32] = 0.4        # patch (1,1): mean 0.4 -> dropped at tau 0.5
    cam[0, 48:56, 48:64] = 1.0        # patch (3,3): half covered, mean 0.5 -> not > tau
    m = patch_mask(cam, 16, 0.5)
    assert m.shape == (1, 4, 4) and m.sum() == 1 and m[0, 0, 0]
    img = np.full((1, 64, 64), 200, np.uint8)
    out = apply_mask(img, m, 16)
    assert (out[0, :16, :16] == 200).all() and out.sum() == 200 * 256
    with pytest.raises(ValueError, match="multiple of cam.patch"):
        patch_mask(np.zeros((1, 30, 30)), 16, 0.5)


def test_select_regions_caps_by_score():
    scores = np.array([0.1, 0.9, 0.5, 0.7, 0.2, 0.8])
    diseases = np.array([0, 0, 0, 1, 1, 0])
    assert select_regions(scores, diseases, 2).tolist() == [1, 3, 4, 5]


def test_masked_mean_pool_and_grid():
    tokens = torch.arange(8, dtype=torch.float32).view(1, 4, 2)  # 2x2 grid, 2 channels
    mask = torch.tensor([[[True, False], [False, True]]])
    torch.testing.assert_close(masked_mean_pool(tokens, mask), torch.tensor([[3.0, 4.0]]))
    torch.testing.assert_close(masked_mean_pool(tokens, torch.zeros_like(mask)), tokens.mean(1))
    fine = torch.zeros(1, 4, 4, dtype=torch.bool)
    fine[0, 3, 0] = True
    assert mask_to_grid(fine, (2, 2)).tolist() == [[[False, False], [True, False]]]


def test_report_sampling_proportional_and_seeded():
    labels = np.zeros((1000, 14), np.int8)
    labels[:600, 0] = 1
    labels[600:900, 2] = 1
    labels[900:, 10] = 1
    picks = sample_reports_by_disease(labels, 100, seed=3)
    by_d = np.bincount([d for _, d in picks], minlength=14)
    assert by_d[0] == 60 and by_d[2] == 30 and by_d[10] == 10
    assert picks == sample_reports_by_disease(labels, 100, seed=3)
    assert picks != sample_reports_by_disease(labels, 100, seed=4)
    rows = sentence_rows(["a . b .", "a . c ."], ["s1", "s2"], [(0, 0), (1, 2)])
    assert rows["sentence"] == ["a", "b", "c"] and rows["count"] == [2, 1, 1] and rows["study_id"] == ["s1", "s1", "s2"]


def test_vision_checkpoint_loads_local_weights(tmp_path):
    from safetensors.torch import save_file

    from amrg.models.vision import VisionEncoder

    src = VisionEncoder("swin_tiny_patch4_window7_224", **TINY)
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    dst = VisionEncoder("swin_tiny_patch4_window7_224", checkpoint=str(tmp_path / "w.safetensors"), **TINY)
    for k, v in src.model.state_dict().items():
        assert torch.equal(v, dst.model.state_dict()[k]), k
    torch.save({"state_dict": {k: v for k, v in list(src.model.state_dict().items())[:3]}}, tmp_path / "part.pt")
    with pytest.raises(ValueError, match="lacks"):
        VisionEncoder("swin_tiny_patch4_window7_224", checkpoint=str(tmp_path / "part.pt"), **TINY)
    with pytest.raises(FileNotFoundError, match="vision.checkpoint"):
        VisionEncoder("swin_tiny_patch4_window7_224", checkpoint=str(tmp_path / "nope.pt"), **TINY)
