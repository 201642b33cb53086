"""amrg.data.store: image targets, view rows of unknown studies, and the one packed CAM-mask format."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from amrg.data.store import (Images, Studies, image_targets, pack_masks, read_patch_mask, unpack_masks,
                             with_patch_mask)
from amrg.io import read_parquet, write_parquet
from amrg.labels.schema import CHEXPERT_14

A, B = CHEXPERT_14.index("Cardiomegaly"), CHEXPERT_14.index("Edema")


def _data():
    labels = np.full((3, 14), np.nan, np.float32)
    labels[0, A], labels[0, B] = 1, -1  # s0: Cardiomegaly, Edema uncertain
    labels[1, A], labels[1, B] = 0, 1  # s1: no Cardiomegaly, Edema
    # the classifier's targets are `labels`; the labeler's reading (CE's reference) says nothing here, so a
    # target that shows up below comes from the targets (labels.source), never from the labeler's columns
    labeler = np.full((3, 14), np.nan, np.float32)
    studies = Studies(["s0", "s1", "s2"], np.array(["train", "train", "test"]), ["", "", ""], labeler, labels)
    # images (row: study): 0: s1, 1: s0, 2: s0, 3: s2
    images = Images(["s1", "s0", "s0", "s2"], np.array([0, 0, 1, 0]), np.array(["train", "train", "train", "test"]),
                    np.zeros((4, 2, 2), np.uint8))
    return studies, images


def test_image_targets_are_the_binarised_labels_of_each_images_study():
    studies, images = _data()
    neg = image_targets(studies, images, [2, 0, 3], "negative")
    assert neg.dtype == np.float32 and neg.shape == (3, 14)
    # row 2 (s0): A 1, B -1 -> 0; row 0 (s1): A 0, B 1; row 3 (s2): nothing mentioned -> all 0
    assert (neg[0, A], neg[0, B], neg[1, A], neg[1, B]) == (1, 0, 0, 1) and neg[2].sum() == 0
    assert neg.sum() == 2
    pos = image_targets(studies, images, np.array([2]), "positive")
    assert (pos[0, A], pos[0, B]) == (1, 1) and pos.sum() == 2  # -1 -> 1
    every = image_targets(studies, images, None, "negative")
    np.testing.assert_array_equal(every[[2, 0, 3]], neg)
    assert image_targets(studies, images, [], "negative").shape == (0, 14)
    images.study_ids[3] = "s9"
    with pytest.raises(KeyError, match="'s9'.*no row in studies"):
        image_targets(studies, images, [3], "negative")


def test_study_views_names_a_study_without_images():
    _, images = _data()
    assert images.study_views(["s0", "s2"]).tolist() == [[1, 2], [3, 3]]
    with pytest.raises(KeyError, match=r"'s7'.*images\.parquet"):
        images.study_views(["s0", "s7"])


@pytest.mark.parametrize("side", [3, 14])  # 9 bits (padding in the last byte) and the paper's 14 x 14
def test_patch_mask_round_trip_through_a_parquet_file(tmp_path, side):
    rng = np.random.default_rng(side)
    masks = rng.random((5, side, side)) > 0.5
    base = pa.table({"study_id": [f"s{i}" for i in range(5)]}).replace_schema_metadata({"other": "kept"})
    table = with_patch_mask(base, masks, patch=16).append_column("n_patches", pa.array(masks.sum((1, 2)), pa.int16()))
    # the bytes are row-major np.packbits of each mask (the format mine_cam wrote by hand)
    expect = np.packbits(masks.reshape(5, -1), axis=1)
    assert table.column("patch_mask").to_pylist() == [r.tobytes() for r in expect]
    assert table.schema.field("patch_mask").type == pa.binary(-(-side * side // 8))
    write_parquet(tmp_path / "regions.parquet", table)
    back = read_parquet(tmp_path / "regions.parquet")
    got, patch = read_patch_mask(back)
    assert patch == 16 and got.dtype == bool and got.shape == (5, side, side)
    np.testing.assert_array_equal(got, masks)
    assert back.schema.metadata[b"other"] == b"kept"
    got_sel, _ = read_patch_mask(back.select(["study_id", "patch_mask"]))  # survives a column selection
    np.testing.assert_array_equal(got_sel, masks)


def test_patch_mask_empty_and_errors(tmp_path):
    empty = with_patch_mask(pa.table({"study_id": pa.array([], pa.string())}), np.zeros((0, 14, 14), bool), 16)
    write_parquet(tmp_path / "e.parquet", empty)
    got, patch = read_patch_mask(read_parquet(tmp_path / "e.parquet"))
    assert got.shape == (0, 14, 14) and patch == 16
    base = pa.table({"x": [1, 2]})
    with pytest.raises(ValueError, match="3 masks for a table of 2 rows"):
        with_patch_mask(base, np.zeros((3, 4, 4), bool), 8)
    with pytest.raises(ValueError, match=r"\(N, side, side\)"):
        with_patch_mask(base, np.zeros((2, 4, 5), bool), 8)
    with pytest.raises(ValueError, match="patch must be a positive integer"):
        with_patch_mask(base, np.zeros((2, 4, 4), bool), 0)
    with pytest.raises(ValueError, match="already has"):
        with_patch_mask(with_patch_mask(base, np.zeros((2, 4, 4), bool), 8), np.zeros((2, 4, 4), bool), 8)
    hand = base.append_column("patch_mask", pa.array([b"\x00\x00"] * 2, pa.binary(2)))  # no metadata
    with pytest.raises(ValueError, match="patch size.*dvc repro mine_cam"):
        read_patch_mask(hand)


def test_pack_unpack_masks_any_square_size():
    region = np.zeros((1, 5, 5), bool)
    region[0, 1:3, 2:5] = True
    packed = pack_masks(region)
    assert packed.shape == (1, 4) and packed.dtype == np.uint8
    np.testing.assert_array_equal(unpack_masks(packed, 5), region)
    with pytest.raises(ValueError, match=r"\(N, 4\) bytes"):
        unpack_masks(packed[:, :3], 5)
