"""Rule labeler throughput: N reports assembled from IU X-ray sentences (plus a share of perturbed,
never-seen sentences so the per-sentence cache cannot answer everything).

    python bench/labeler_speed.py --n 100000 --unique 0.3
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from amrg.labels import label, split_sentences

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--unique", type=float, default=0.3, help="share of sentences made unique")
    ap.add_argument("--annotation", default=str(ROOT / "data/iu_xray/annotation.json"))
    args = ap.parse_args()
    data = json.loads(Path(args.annotation).read_text())
    sentences = [s for split in data.values() for e in split for s in split_sentences(e["report"])]
    rng = random.Random(0)
    reports = []
    for i in range(args.n):
        sents = rng.sample(sentences, k=rng.randint(3, 7))
        if rng.random() < args.unique:
            sents[0] = f"{sents[0]} case {i}"
        reports.append(" ".join(sents))
    t0 = time.perf_counter()
    out = label(reports)
    dt = time.perf_counter() - t0
    print(f"labelled {len(reports):,} reports ({args.unique:.0%} with a unique sentence) in {dt:.1f} s "
          f"= {len(reports) / dt:,.0f} reports/s on one core; output {out.shape}")


if __name__ == "__main__":
    main()
