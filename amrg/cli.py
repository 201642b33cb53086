"""``amrg`` command: check params, show the state of a workspace.

    amrg check [--params params.yaml]   validate every key before running anything
    amrg show  [--params params.yaml]   params hash, data flag, stage status (dvc) and headline metrics
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

from .config import ParamsError, load_params


def _check(args) -> int:
    try:
        load_params(args.params)
    except ParamsError as e:
        print(e, file=sys.stderr)
        return 2
    print(f"{args.params}: ok")
    return 0


def _show(args) -> int:
    params = load_params(args.params)
    digest = hashlib.sha256(Path(args.params).read_bytes()).hexdigest()[:12]
    print(f"params {args.params} sha256:{digest}  dataset={params.data.dataset}  "
          f"images={'PHANTOM' if params.data.images_dir is None else params.data.images_dir}")
    if shutil.which("dvc"):
        status = subprocess.run(["dvc", "status"], capture_output=True, text=True)
        print("dvc status:", (status.stdout or status.stderr).strip() or "up to date")
    metrics = Path("artifacts/eval/metrics.json")
    if not metrics.exists():
        print("no evaluation yet: run `dvc repro`")
        return 0
    m = json.loads(metrics.read_text())
    print(("PHANTOM IMAGES  " if m.get("phantom_images") else "") + f"test studies {m['n_test']}")
    for name, r in [("model", m["model"])] + list(m.get("baselines", {}).items()):
        print(f"  {name:14} BLEU-4 {r['BLEU_4']:.3f}  ROUGE-L {r['ROUGE_L']:.3f}  CE F1 {r['ce']['f1']:.3f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="amrg", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, fn in (("check", _check), ("show", _show)):
        p = sub.add_parser(name)
        p.add_argument("--params", default="params.yaml")
        p.set_defaults(fn=fn)
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
