"""Bench: a second worker restores the pipeline from the shared DVC remote instead of recomputing it.

Two git clones of this working tree (dvc.lock not committed, so only the run-cache can tell what was
computed) sit beside one local directory remote (the committed .dvc/config: ``../amrg-dvc-remote``).

1. worker1: ``dvc repro`` (compute every stage), then ``dvc push --run-cache``.
2. worker2: ``dvc pull --run-cache --allow-missing`` then ``dvc repro --pull``: every stage must be
   restored from the run-cache ("is cached - skipping run"), none run, and every output byte-equal
   to worker1's.

Prints (and with ``--out`` writes) the seconds of each step, the restore/recompute ratio and the
remote's size.

    python bench/remote_restore.py                  # the embedded default (params.yaml as it is)
    python bench/remote_restore.py --profile tiny   # 12 studies per split, one epoch each
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _workspaces import DVC, clone, env, make_origin, ran, restored, run, tree_size  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", choices=["default", "tiny"], default="default")
    ap.add_argument("--workdir", default=None, help="keep the clones here (default: a temp dir, removed)")
    ap.add_argument("--out", default=None, help="write the result JSON here")
    args = ap.parse_args(argv)

    tmp = Path(args.workdir or tempfile.mkdtemp(prefix="amrg-remote-restore-"))
    tmp.mkdir(parents=True, exist_ok=True)
    log = tmp / "bench.log"
    e = env(tmp, CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES", ""))
    try:
        make_origin(tmp, args.profile == "tiny", e)
        w1 = clone(tmp, "worker1", e)
        t_compute, out1 = run(DVC + ["repro"], w1, e, log)
        t_push, _ = run(DVC + ["push", "--run-cache"], w1, e, log)
        n_files, n_bytes = tree_size(tmp / "amrg-dvc-remote")

        w2 = clone(tmp, "worker2", e)
        t_pull, _ = run(DVC + ["pull", "--run-cache", "--allow-missing"], w2, e, log)
        t_repro, out2 = run(DVC + ["repro", "--pull"], w2, e, log)
        a = {p.relative_to(w1).as_posix(): p for p in (w1 / "artifacts").rglob("*") if p.is_file()}
        b = {p.relative_to(w2).as_posix(): p for p in (w2 / "artifacts").rglob("*") if p.is_file()}
        identical = a.keys() == b.keys() and all(a[k].read_bytes() == b[k].read_bytes() for k in a)
        result = {
            "profile": args.profile,
            "machine": f"{platform.node()}: {os.cpu_count()} cpus, {platform.platform()}",
            "worker1_recompute_s": round(t_compute, 1),
            "worker1_stages_run": ran(out1),
            "worker1_push_run_cache_s": round(t_push, 1),
            "remote": {"files": n_files, "bytes": n_bytes},
            "worker2_pull_s": round(t_pull, 1),
            "worker2_repro_pull_s": round(t_repro, 1),
            "worker2_restore_total_s": round(t_pull + t_repro, 1),
            "worker2_stages_run": ran(out2),
            "worker2_stages_restored": restored(out2),
            "outputs_identical": identical,
            "output_files": len(b),
            "restore_over_recompute": round((t_pull + t_repro) / t_compute, 3),
        }
    finally:
        if not args.workdir:
            shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    ok = identical and not result["worker2_stages_run"] and result["worker2_stages_restored"] == result["worker1_stages_run"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
