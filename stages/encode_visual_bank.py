"""Stage encode_visual_bank (paper III-C): the disease-aware visual bank V (n_v x C).

``banks.visual.unit: region`` (the paper): each CAM region's masked image x′ goes through the stage-1
vision encoder; the region's vector is the mean of the tokens that lie in its kept patches (see
:mod:`amrg.banks`). ``patch`` (the released ``SwinCheX/cam.py``): a row per kept patch of every region,
its ``cam.patch``-pixel crop resized to the image size and encoded alone, the mean of all its tokens.
rows.parquet gives each row's region metadata (and, for patches, its region and patch coordinates), and
the bank says which CAM rule made its regions (``cam_rule`` in the safetensors metadata and metrics.json).
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import torch

from amrg.banks import mask_to_grid, masked_mean_pool, patch_crops, read_region_rule
from amrg.data.store import pixels_of, read_patch_mask
from amrg.io import autocast, progress, read_parquet, save_tensors, setup_runtime, write_json, write_parquet
from amrg.models.load import load_classifier

from .common import Timer, start, write_resolved


def main(argv: list[str] | None = None) -> None:
    params, log, layout = start("encode_visual_bank", argv)
    p, timer, out = params.banks.visual, Timer(), layout.stage_dir("encode_visual_bank")
    device = setup_runtime(params.runtime)
    regions = read_parquet(layout.regions)
    rule = read_region_rule(regions)
    if regions.num_rows == 0:
        raise ValueError(f"{layout.regions} has no regions: lower cam.tau or check the classifier")
    encoder = load_classifier(layout.stage_dir("train_classifier"), device).encoder
    pixels = torch.from_numpy(np.array(pixels_of(regions)))
    masks, patch = read_patch_mask(regions)
    rows = regions.select(["study_id", "view", "disease", "disease_name", "score"])
    vectors = []
    with torch.inference_mode():
        if p.unit == "region":
            masks = torch.from_numpy(masks)
            for s in progress(range(0, len(pixels), p.batch_size), "visual bank", unit="batch"):
                with autocast(device, params.runtime.precision):
                    tokens = encoder(pixels[s:s + p.batch_size].to(device)).float()
                grid_mask = mask_to_grid(masks[s:s + p.batch_size].to(device), encoder.grid)
                vectors.append(masked_mean_pool(tokens, grid_mask).cpu())
            pooling = "mean of encoder tokens in kept patches"
        else:
            region, prow, pcol = np.nonzero(masks)  # every kept patch, region by region, row-major
            for s in progress(range(0, len(region), p.batch_size), "visual bank (patches)", unit="batch"):
                r = torch.from_numpy(region[s:s + p.batch_size])
                y, x = (torch.from_numpy(a[s:s + p.batch_size]).to(device) for a in (prow, pcol))
                crops = patch_crops(pixels[r].to(device), y, x, patch)
                with autocast(device, params.runtime.precision):
                    vectors.append(encoder(crops).float().mean(1).cpu())
            rows = rows.take(pa.array(region)).append_column("region", pa.array(region, pa.int32())) \
                .append_column("patch_row", pa.array(prow, pa.int16())) \
                .append_column("patch_col", pa.array(pcol, pa.int16()))
            pooling = f"mean of encoder tokens of each kept {patch}-pixel patch crop, resized to the image size"
    bank = torch.cat(vectors)
    if not torch.isfinite(bank).all():
        bad = int((~torch.isfinite(bank)).any(1).sum())
        raise FloatingPointError(f"visual bank has NaN/inf in {bad} of {len(bank)} rows: the classifier weights "
                                 "are not finite (check the train_classifier stage)")
    save_tensors(layout.visual_bank, {"bank": bank},
                 metadata={"pooling": "masked_mean_tokens" if p.unit == "region" else "mean_tokens_of_patch_crop",
                           "unit": p.unit, "cam_rule": json.dumps(rule, sort_keys=True)})
    write_parquet(out / "rows.parquet", rows)
    write_json(out / "metrics.json", {"phantom_images": layout.is_phantom(), "n_v": int(bank.shape[0]),
                                      "dim": int(bank.shape[1]), "unit": p.unit, "regions": regions.num_rows,
                                      "pooling": pooling, "cam_rule": rule,
                                      "regions_per_s": round(len(bank) / max(timer(), 1e-9), 1)})
    write_resolved(out, banks_visual=p, runtime=params.runtime)
    log.info("visual bank %s in %.1fs", tuple(bank.shape), timer())


if __name__ == "__main__":
    main()
