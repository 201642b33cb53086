"""Stage encode_visual_bank (paper III-C): the disease-aware visual bank V (n_v x C).

Each CAM region's masked image goes through the stage-1 vision encoder; the region's vector is the
mean of the tokens that lie in its kept patches (see :mod:`amrg.banks`). Rows keep their metadata.
"""

from __future__ import annotations

import numpy as np
import torch

from amrg.banks import mask_to_grid, masked_mean_pool
from amrg.data.store import pixels_of, read_patch_mask
from amrg.io import autocast, progress, read_parquet, save_tensors, setup_runtime, write_json, write_parquet
from amrg.models.load import load_classifier

from .common import Timer, start, write_resolved


def main(argv: list[str] | None = None) -> None:
    params, log, layout = start("encode_visual_bank", argv)
    p, timer, out = params.banks.visual, Timer(), layout.stage_dir("encode_visual_bank")
    device = setup_runtime(params.runtime)
    regions = read_parquet(layout.regions)
    if regions.num_rows == 0:
        raise ValueError(f"{layout.regions} has no regions: lower cam.tau or check the classifier")
    encoder = load_classifier(layout.stage_dir("train_classifier"), device).encoder
    pixels = torch.from_numpy(np.array(pixels_of(regions)))
    masks = torch.from_numpy(read_patch_mask(regions)[0])
    vectors = []
    with torch.inference_mode():
        for s in progress(range(0, len(pixels), p.batch_size), "visual bank", unit="batch"):
            with autocast(device, params.runtime.precision):
                tokens = encoder(pixels[s:s + p.batch_size].to(device)).float()
            grid_mask = mask_to_grid(masks[s:s + p.batch_size].to(device), encoder.grid)
            vectors.append(masked_mean_pool(tokens, grid_mask).cpu())
    bank = torch.cat(vectors)
    if not torch.isfinite(bank).all():
        bad = int((~torch.isfinite(bank)).any(1).sum())
        raise FloatingPointError(f"visual bank has NaN/inf in {bad} of {len(bank)} rows: the classifier weights "
                                 "are not finite (check the train_classifier stage)")
    save_tensors(layout.visual_bank, {"bank": bank}, metadata={"pooling": "masked_mean_tokens"})
    write_parquet(out / "rows.parquet", regions.select(["study_id", "view", "disease", "disease_name", "score"]))
    write_json(out / "metrics.json", {"phantom_images": layout.is_phantom(), "n_v": int(bank.shape[0]),
                                      "dim": int(bank.shape[1]), "pooling": "mean of encoder tokens in kept patches",
                                      "regions_per_s": round(len(bank) / max(timer(), 1e-9), 1)})
    write_resolved(out, banks_visual=p, runtime=params.runtime)
    log.info("visual bank %s in %.1fs", tuple(bank.shape), timer())


if __name__ == "__main__":
    main()
