"""Native GradCAM (issue 19): pytorch-grad-cam's GradCAM map for every encoder family, with the gradient
taken only to the target layer (no parameter gradients), one encoder forward per distinct image, and the
library's blank map where the target's gradient is zero; ``CamMiner``'s backend choice."""

import numpy as np
import pytest
import torch

from amrg.cam import CamMiner, head_from_feature_map, min_max_scale, native_gradcam, upsample_and_scale
from amrg.models.classifier import ClassifierSpec, DiseaseClassifier

TOL = 1e-2  # the brief's max-abs tolerance against the library (cv2 resize vs F.interpolate)

# the tiny timm presets of tests/test_models.py, one per family: Swin (channels-last), ViT (tokens), a CNN
FAMILIES = {
    "swin": ("swin_tiny_patch4_window7_224", dict(patch_size=16, embed_dim=32, depths=[2], num_heads=[2]), 224),
    "vit": ("vit_tiny_patch16_224", dict(embed_dim=32, depth=1, num_heads=2), 224),
    "resnet": ("resnet18", {}, 128),
}
# (image, disease) targets: image 0 twice with two diseases, image 2 twice with one, out of order
IMAGES, DISEASES = [0, 1, 0, 2, 2], [3, 5, 8, 1, 1]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    name, kw, size = FAMILIES[request.param]
    torch.manual_seed(0)
    model = DiseaseClassifier(ClassifierSpec(name, kw, size, 32, 1, 4)).eval()
    g = torch.Generator().manual_seed(1)
    imgs = torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g)
    return request.param, model, imgs[IMAGES]


def _library(model, pixels, diseases):
    miner = CamMiner(model, "gradcam", backend="library")
    try:
        assert miner.backend == "library"
        return miner(pixels, diseases)
    finally:
        miner.close()


def test_head_from_feature_map_is_the_classifier_after_the_target_layer(family):
    _, model, x = family
    with torch.no_grad():
        torch.testing.assert_close(head_from_feature_map(model, model.encoder.feature_grid(x)), model(x))


def test_native_equals_the_library_without_parameter_gradients(family):
    name, model, x = family
    want = _library(model, x, DISEASES)
    assert any(p.grad is not None for p in model.encoder.parameters())  # the library backprops the encoder
    model.zero_grad(set_to_none=True)
    rows = []
    hook = model.encoder.feature_map.register_forward_hook(lambda m, i, o: rows.append(len(o)))
    try:
        got = native_gradcam(model, x, DISEASES, "fp32")
    finally:
        hook.remove()
    assert rows == [3]  # one encoder forward over the 3 distinct images, for 5 targets
    assert all(p.grad is None for p in model.parameters())
    assert got.dtype == np.float32 and got.shape == want.shape == x.shape
    assert want.reshape(len(x), -1).max(1).min() > 0.5  # real maps, not blanks
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    assert np.abs(got - want).max() < 1e-4, (name, np.abs(got - want).max())  # in fact far tighter
    assert np.abs(got[0] - got[2]).max() > 0.05  # same image, two diseases: two maps
    np.testing.assert_array_equal(got[3], got[4])


def test_zero_gradient_target_gives_the_library_blank_map(family):
    _, model, x = family
    d = 6
    with torch.no_grad():
        saved = model.head_weight[d].clone()
        model.head_weight[d] = 0.0  # logit_d = bias: no gradient to the feature map
    try:
        want = _library(model, x[:2], [d, 2])
        got = native_gradcam(model, x[:2], [d, 2])
    finally:
        with torch.no_grad():
            model.head_weight[d] = saved
    assert not want[0].any() and not got[0].any()
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_upsample_and_scale_by_hand():
    cam = torch.tensor([[[0.0, 2.0], [4.0, 6.0]], [[0.0, 0.0], [0.0, 0.0]]])
    got = upsample_and_scale(cam, (4, 4))
    # min-max to [0, 1/3, 2/3, 1], then half-pixel bilinear x2: rows/cols at src -0.25 (clamped), 0.25, 0.75, 1.25
    row = torch.tensor([0.0, 0.25, 0.75, 1.0])
    want = (row[None, :] / 3 + row[:, None] * 2 / 3)
    torch.testing.assert_close(got[0], want / (1e-7 + want.max()), rtol=0, atol=1e-6)
    assert not got[1].any()  # a blank map stays blank
    torch.testing.assert_close(min_max_scale(torch.tensor([[[1.0, 3.0]]])), torch.tensor([[[0.0, 2 / (2 + 1e-7)]]]))


def test_miner_backends():
    _, kw, size = FAMILIES["vit"]
    torch.manual_seed(0)
    model = DiseaseClassifier(ClassifierSpec("vit_tiny_patch16_224", kw, size, 32, 1, 4)).eval()
    x = torch.randint(0, 256, (2, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    picks = {(m, b): CamMiner(model, m, backend=b) for m, b in
             [("gradcam", "auto"), ("gradcam", "native"), ("gradcam", "library"), ("gradcam++", "native")]}
    try:
        assert {k: v.backend for k, v in picks.items()} == {
            ("gradcam", "auto"): "library",  # auto on CPU
            ("gradcam", "native"): "native", ("gradcam", "library"): "library",
            ("gradcam++", "native"): "library"}  # only gradcam is native
        np.testing.assert_allclose(picks["gradcam", "native"](x, [0, 4]), picks["gradcam", "library"](x, [0, 4]),
                                   atol=TOL, rtol=0)
    finally:
        for m in picks.values():
            m.close()
    with pytest.raises(ValueError, match="unknown cam.backend"):
        CamMiner(model, "gradcam", backend="fast")
    assert native_gradcam(model, x[:0], []).shape == (0, size, size)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 autocast needs CUDA")
def test_bf16_on_cuda_is_close_to_fp32():
    _, kw, size = FAMILIES["swin"]
    torch.manual_seed(0)
    model = DiseaseClassifier(ClassifierSpec(FAMILIES["swin"][0], kw, size, 32, 1, 4)).eval().cuda()
    x = torch.randint(0, 256, (4, size, size), dtype=torch.uint8, device="cuda")
    fp32, bf16 = native_gradcam(model, x, [0, 1, 2, 3], "fp32"), native_gradcam(model, x, [0, 1, 2, 3], "bf16")
    assert bf16.dtype == np.float32 and np.abs(fp32 - bf16).mean() < 0.05
    assert CamMiner(model, "gradcam", backend="auto").backend == "native"
