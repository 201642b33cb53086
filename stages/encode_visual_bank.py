"""Stage encode_visual_bank (paper III-C): the disease-aware visual bank V (n_v x C).

Each CAM region's masked image goes through the stage-1 vision encoder; the region's vector is the
mean of the tokens that lie in its kept patches (see :mod:`amrg.banks`). Rows keep their metadata.
"""

from __future__ import annotations

import numpy as np
import torch

from amrg.banks import mask_to_grid, masked_mean_pool
from amrg.data.store import pixels_of
from amrg.io import autocast, read_parquet, save_tensors, setup_runtime, write_json, write_parquet
from amrg.models.load import load_classifier

from .common import ARTIFACTS, Timer, is_phantom, start, write_resolved

CLS, CAM, OUT = ARTIFACTS / "classifier", ARTIFACTS / "cam", ARTIFACTS / "banks" / "visual"


def main(argv: list[str] | None = None) -> None:
    params, log = start("encode_visual_bank", argv)
    p, timer = params.banks.visual, Timer()
    device = setup_runtime(params.runtime)
    regions = read_parquet(CAM / "regions.parquet")
    if regions.num_rows == 0:
        raise ValueError(f"{CAM / 'regions.parquet'} has no regions: lower cam.tau or check the classifier")
    encoder = load_classifier(CLS, device).encoder
    pixels = torch.from_numpy(np.array(pixels_of(regions)))
    packed = np.stack([np.frombuffer(b, np.uint8) for b in regions.column("patch_mask").to_pylist()])
    side = int(round((pixels.shape[-1] // params.cam.patch)))
    masks = torch.from_numpy(np.unpackbits(packed, axis=1)[:, : side * side].reshape(-1, side, side).astype(bool))
    vectors = []
    with torch.inference_mode():
        for s in range(0, len(pixels), p.batch_size):
            with autocast(device, params.runtime.precision):
                tokens = encoder(pixels[s:s + p.batch_size].to(device)).float()
            grid_mask = mask_to_grid(masks[s:s + p.batch_size].to(device), encoder.grid)
            vectors.append(masked_mean_pool(tokens, grid_mask).cpu())
    bank = torch.cat(vectors)
    if not torch.isfinite(bank).all():
        raise FloatingPointError("visual bank has NaN/inf rows: the classifier weights are not finite")
    save_tensors(OUT / "bank.safetensors", {"bank": bank}, metadata={"pooling": "masked_mean_tokens"})
    write_parquet(OUT / "rows.parquet", regions.select(["study_id", "view", "disease", "disease_name", "score"]))
    write_json(OUT / "metrics.json", {"phantom_images": is_phantom(), "n_v": int(bank.shape[0]), "dim": int(bank.shape[1]),
                                      "pooling": "mean of encoder tokens in kept patches",
                                      "regions_per_s": round(len(bank) / max(timer(), 1e-9), 1)})
    write_resolved(OUT, banks_visual=p, cam_patch=params.cam.patch, runtime=params.runtime)
    log.info("visual bank %s in %.1fs", tuple(bank.shape), timer())


if __name__ == "__main__":
    main()
