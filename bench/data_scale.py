"""Data at scale: preprocess throughput against the bare decode rate, and peak memory against dataset size.

Builds a synthetic MIMIC-CXR-JPG + reports tree of N studies (``tests._fixtures_mimic.synthetic_mimic_tree``:
two small JPEGs per study, the official split ~98/1/1 by patient) and, for each N, runs in a fresh
directory the stages whose memory could grow with the dataset: ``preprocess``, ``train_classifier``,
then ``mine_cam`` / ``encode_*_bank`` (needed by the generator) and ``train_generator``, each as its own
``python -m stages.<name>`` process. Measured in the same run:

- **throughput**: preprocess images/s (whole stage, and its decode-and-write part) against the anchor,
  the bare decode rate of the same files (``decode_image`` over the same number of processes, nothing
  written). Goal: >= 0.8x.
- **peak RSS of the whole process tree** (the stage plus its decode workers or torchrun children; sampled
  every 20 ms with psutil) per stage. Goal: from N to 10 N studies the peak grows by less than a quarter
  of the pixel bytes added. The anchor: a process that holds ``pixels.npy`` in RAM (``np.load``), whose
  peak grows by the pixel bytes themselves.

Usage: ``python -m bench.data_scale [--sizes 5000 50000] [--image-size 64] [--workdir DIR] [--keep]``.
Prints one JSON object (also written to ``<workdir>/data_scale.json``). Never run by CI.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from amrg.config import merge_overlay  # noqa: E402
from tests._fixtures_mimic import synthetic_mimic_tree  # noqa: E402

STAGES = ("preprocess", "train_classifier", "mine_cam", "encode_visual_bank", "encode_report_bank", "train_generator")
MEASURED = ("preprocess", "train_classifier", "train_generator")
SAMPLE_S = 0.02


def tree_memory(proc: psutil.Process) -> tuple[int, int]:
    """(RSS, PSS) bytes summed over ``proc`` and all its descendants. PSS (proportional set size) counts
    a page shared by k processes 1/k in each, so its sum is the tree's memory; the RSS sum counts shared
    pages (libraries, copy-on-write pages of a fork) once per process."""
    rss = pss = 0
    try:
        tree = [proc, *proc.children(recursive=True)]
    except psutil.Error:  # the stage just ended
        return 0, 0
    for p in tree:
        try:
            info = p.memory_full_info()
            rss, pss = rss + info.rss, pss + info.pss
        except psutil.Error:
            pass
    return rss, pss


def run_measured(cmd: list[str], cwd: Path, env: dict) -> tuple[float, int, int]:
    """Run ``cmd``; return (seconds, peak RSS sum, peak PSS sum of its process tree, in bytes)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc, peak, done = psutil.Process(p.pid), [0, 0], threading.Event()

    def sample():
        while not done.is_set():
            rss, pss = tree_memory(proc)
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], pss)
            time.sleep(SAMPLE_S)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, _ = p.communicate()
    done.set()
    t.join()
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out[-3000:]}")
    return time.perf_counter() - t0, peak[0], peak[1]


def _decode_chunk(args) -> int:
    from amrg.data.images import decode_image

    root, rels, size = args
    for rel in rels:
        decode_image(root, rel, size)
    return len(rels)


def bare_decode_rate(root: str, rels: list[str], size: int, workers: int, chunk: int) -> float:
    """Images/s of decoding ``rels`` (nothing written) over ``workers`` processes, in ``chunk``-sized tasks."""
    jobs = [(root, rels[s:s + chunk], size) for s in range(0, len(rels), chunk)]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        n = sum(pool.map(_decode_chunk, jobs))
    return n / (time.perf_counter() - t0)


HOLD_ALL = ("import numpy as np, sys; a = np.load(sys.argv[1]); a.sum(); print(a.nbytes)")


def params_for(tree: dict, image_size: int, workers: int) -> dict:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    return merge_overlay(raw, {
        "runtime": {"device": "cpu"},
        "data": {"dataset": "mimic_cxr", "root": str(tree["root"]), "reports": str(tree["reports"]),
                 "annotation": None, "images": "files", "image_size": image_size, "workers": workers},
        "classifier": {"epochs": 1, "batch_size": 64, "warmup_steps": 0},
        "cam": {"max_per_disease": 20},
        "banks": {"report": {"size": 200}},
        "generator": {"epochs": 1, "batch_size": 64, "max_report_tokens": 24, "warmup_steps": 0},
    })


def measure(n: int, image_size: int, workdir: Path, workers: int, stages: tuple[str, ...] = STAGES) -> dict:
    d = workdir / f"n{n}"
    shutil.rmtree(d, ignore_errors=True)
    t0 = time.perf_counter()
    tree = synthetic_mimic_tree(d / "mimic", n, image_size=image_size)
    build_s = time.perf_counter() - t0
    params = params_for(tree, image_size, workers)
    (d / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    out = {"studies": n, "images": tree["n_images"], "tree_seconds": round(build_s, 1), "stages": {}}
    for stage in stages:
        seconds, rss, pss = run_measured([sys.executable, "-m", f"stages.{stage}", "--params", "params.yaml"], d, env)
        out["stages"][stage] = {"seconds": round(seconds, 1), "peak_rss_mb": round(rss / 2**20, 1),
                                "peak_pss_mb": round(pss / 2**20, 1)}
    pixels = d / "artifacts/preprocess/pixels.npy"
    out["pixel_bytes"] = pixels.stat().st_size
    _, rss, pss = run_measured([sys.executable, "-c", HOLD_ALL, str(pixels)], d, env)
    out["hold_all_pixels_peak_rss_mb"], out["hold_all_pixels_peak_pss_mb"] = round(rss / 2**20, 1), round(pss / 2**20, 1)
    timing = json.loads((d / "artifacts/preprocess/timing.json").read_text())
    out["preprocess_images_per_s"] = timing["images_per_s"]  # the whole stage: builder, labeler, decode, write
    out["preprocess_decode_images_per_s"] = timing["decode_images_per_s"]  # the pool's decode + the store's write
    out["preprocess_pool_images_per_s"] = timing["pool_images_per_s"]  # the pool's decode, chunk files written
    import pyarrow.parquet as pq

    from amrg.data.builders import build_dataset
    from amrg.config import load_params

    studies, _ = build_dataset(load_params(d / "params.yaml").data)
    rels = [p for s in studies for p in s.image_paths]
    out["bare_decode_images_per_s"] = round(bare_decode_rate(str(tree["root"]), rels, image_size, workers,
                                                             params["data"]["chunk_images"]), 1)
    out["preprocess_vs_bare_decode"] = round(out["preprocess_images_per_s"] / out["bare_decode_images_per_s"], 3)
    out["preprocess_decode_vs_bare_decode"] = round(out["preprocess_decode_images_per_s"]
                                                    / out["bare_decode_images_per_s"], 3)
    out["preprocess_pool_vs_bare_decode"] = round(out["preprocess_pool_images_per_s"] / out["bare_decode_images_per_s"], 3)
    out["images_in_store"] = pq.read_metadata(d / "artifacts/preprocess/images.parquet").num_rows
    out["disk_mb"] = {"tree": round(sum(f.stat().st_size for f in (d / "mimic").rglob("*") if f.is_file()) / 2**20, 1),
                      "pixels": round(out["pixel_bytes"] / 2**20, 1)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[5000, 50000])
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--preprocess-only", action="store_true", help="throughput only: run preprocess, not training")
    args = ap.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="amrg-data-scale-"))
    stages = ("preprocess",) if args.preprocess_only else STAGES
    runs = [measure(n, args.image_size, workdir, args.workers, stages) for n in args.sizes]
    result = {"image_size": args.image_size, "workers": args.workers, "cpus": os.cpu_count(), "runs": runs}
    if len(runs) >= 2 and not args.preprocess_only:
        a, b = runs[0], runs[-1]
        added = (b["pixel_bytes"] - a["pixel_bytes"]) / 2**20
        studies_added = b["studies"] - a["studies"]
        result["growth"] = {"studies": [a["studies"], b["studies"]], "pixel_mb_added": round(added, 1)}
        for kind in ("rss", "pss"):
            growth = {s: round(b["stages"][s][f"peak_{kind}_mb"] - a["stages"][s][f"peak_{kind}_mb"], 1) for s in MEASURED}
            anchor = b[f"hold_all_pixels_peak_{kind}_mb"] - a[f"hold_all_pixels_peak_{kind}_mb"]
            result["growth"][kind] = {
                "peak_growth_mb": growth, "over_pixels_added": {s: round(g / added, 3) for s, g in growth.items()},
                "kb_per_study_added": {s: round(g * 1024 / studies_added, 2) for s, g in growth.items()},
                "anchor_hold_all_over_pixels_added": round(anchor / added, 3)}
    text = json.dumps(result, indent=2)
    (workdir / "data_scale.json").write_text(text + "\n")
    print(text)
    if not args.keep:
        for n in args.sizes:
            shutil.rmtree(workdir / f"n{n}", ignore_errors=True)


if __name__ == "__main__":
    main()
