"""The state of a workspace on one screen: commit, params hash, data version, DVC status per stage and
the headline metrics table.

    python -m flows.show [--repo .] [--run artifacts] [--params params.yaml] [--json]

Everything DVC-aware lives here, in flows/, not in the ``amrg`` library: the stages and the data file's
locked hash come from DVC's view of the repository (``dvc.repo.Repo``: dvc.yaml with its templates
resolved, dvc.lock), the stage status from ``Repo.status()`` (what ``dvc status`` prints). The params are
validated with :func:`amrg.config.load_params`; the metrics are those of ``<run>/eval/metrics.json``, as
the compact table of :mod:`amrg.metrics.table`. Exit code 2 when params.yaml is invalid.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from amrg.config import ParamsError, load_params, to_dict
from amrg.layout import Layout
from flows.dvc_tasks import DvcPipelineError, dvc_repo, pipeline_stages, stage_address
from amrg.metrics.table import caption, headline_table, systems, to_markdown


def _git(repo: Path, *args: str) -> str:
    p = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
    return p.stdout.strip() if p.returncode == 0 else ""


def _some(items: list[str], limit: int) -> str:
    return ", ".join(items[:limit]) + (f", +{len(items) - limit} more" if len(items) > limit else "")


def _describe(changes: list[Any], limit: int = 3) -> str:
    """``dvc status`` entries of one stage -> ``changed deps: data/x.json (modified), ...; changed outs: ...``,
    at most ``limit`` items (and ``limit`` changed params keys) per kind, so that a stage fits on a line."""
    what = []
    for entry in changes:
        if isinstance(entry, str):
            what.append(entry)
            continue
        for kind, changed in entry.items():
            items = [f"{k} ({_some(list(v), limit)})" if isinstance(v, dict) else f"{k} ({v})" if isinstance(v, str)
                     else str(k) for k, v in changed.items()]
            what.append(f"{kind}: {_some(items, limit)}")
    return "; ".join(what) if what else "up to date"


def dvc_state(repo: Path, data_files: str | list[str]) -> dict[str, Any]:
    """DVC's view: ``{"stages": {stage: status line}, "data": {"path", "md5", "locked"}}``; the data's
    hashes are those DVC computes and records in dvc.lock for the stage(s) that depend on it: the first
    of ``data_files`` some stage depends on (the index stage's manifest, else the annotation file)."""
    from dvc.exceptions import DvcException
    from dvc.lock import LockError

    with dvc_repo(repo) as r:
        order, _ = pipeline_stages(r)
        candidates = [data_files] if isinstance(data_files, str) else list(data_files)
        for data_file in candidates:
            target = os.path.normpath(os.path.join(r.root_dir, data_file))
            deps = [d for s in order for d in s.deps if os.path.normpath(d.fs_path) == target]
            if deps:
                break
        data: dict[str, Any] = {"path": data_file, "md5": None, "locked": None}
        if deps:
            d = deps[0]
            data["locked"] = d.hash_info.value if d.hash_info else None
            try:
                data["md5"] = d.get_hash().value if d.exists else None
            except DvcException:
                data["md5"] = None
        elif Path(target).is_file():
            data["md5"] = hashlib.md5(Path(target).read_bytes()).hexdigest()
        try:
            status = r.status()
        except LockError as e:
            return {"stages": {stage_address(r, s): f"unknown: {e}" for s in order}, "data": data}
        stages = {}
        for s in order:
            name = stage_address(r, s)
            changes = status.get(name, status.get(s.addressing, []))
            stages[name] = _describe(changes)
        return {"stages": stages, "data": data}


def collect(repo: Path, run: Path, params_file: Path) -> dict[str, Any]:
    """Everything ``flows.show`` prints, as a dict (``--json``). Raises ParamsError for invalid params."""
    params = load_params(params_file)
    canon = hashlib.sha256(json.dumps(to_dict(params), sort_keys=True).encode()).hexdigest()[:12]
    dirty = _git(repo, "status", "--porcelain").splitlines()
    out: dict[str, Any] = {
        "commit": _git(repo, "log", "-1", "--format=%h %s") or None,
        "uncommitted": len(dirty),
        "params": {"file": str(params_file), "sha256": canon},
        "dataset": params.data.dataset,
        "images": "phantom" if params.data.images == "phantom" else params.data.image_root,
    }
    try:
        manifest = Layout().manifest.parent.as_posix()  # preprocess's data dep (the index stage's out)
        state = dvc_state(repo, [manifest] + ([params.data.annotation] if params.data.annotation else []))
        out["stages"], out["data"] = state["stages"], state["data"]
    except DvcPipelineError as e:
        out["stages"], out["data"] = None, {"path": params.data.annotation, "md5": None, "locked": None}
        out["dvc_error"] = str(e)
    layout = Layout(run)
    stats = layout.stats
    if stats.is_file():
        st = json.loads(stats.read_text())
        out["studies"], out["skipped"] = st.get("studies"), st.get("skipped", 0)
    metrics = layout.stage_dir("evaluate") / "metrics.json"
    out["metrics"] = None
    if metrics.is_file():
        m = json.loads(metrics.read_text())
        out["metrics"] = {"file": str(metrics), "caption": caption(m), "table": headline_table(m) if systems(m) else [],
                          "ce_convention": (m.get("ce_convention") or {}).get("headline")}
        report = layout.report_html
        out["metrics"]["report"] = str(report) if report.is_file() else None
    return out


def render(s: dict[str, Any]) -> str:
    lines = [f"commit   {s['commit'] or '(no git commit)'}"
             + (f"  [{s['uncommitted']} uncommitted changes]" if s["uncommitted"] else ""),
             f"params   {s['params']['file']}  sha256 {s['params']['sha256']} (of the validated values)"]
    d = s["data"]
    md5 = (d["md5"] or "missing")[:8]
    state = "" if d["locked"] is None else ("  = dvc.lock" if d["locked"] == d["md5"]
                                            else f"  != dvc.lock {d['locked'][:8]} (rerun preprocess)")
    images = "PHANTOM (drawn from the labels)" if s["images"] == "phantom" else s["images"]
    lines.append(f"data     {s['dataset']}: {d['path']} md5 {md5}{state}; images {images}")
    if "studies" in s:
        lines.append(f"         studies {s['studies']}, skipped {s['skipped']}")
    if s["stages"] is None:
        lines.append(f"stages   not available: {s.get('dvc_error')}")
    else:
        lines.append("stages   (dvc status)")
        lines += [f"  {name:20} {what}" for name, what in s["stages"].items()]
    m = s["metrics"]
    if m is None:
        lines.append("metrics  no evaluation yet: run `dvc repro` (or `dvc repro evaluate`)")
        return "\n".join(lines)
    lines.append(f"metrics  {m['file']}" + (f": {m['caption']}" if m["caption"] else ""))
    lines += ["  " + row for row in to_markdown(m["table"]).splitlines()]
    if m["ce_convention"]:
        lines.append(f"  CE: {m['ce_convention']}")
    if m["report"]:
        lines.append(f"  report: {m['report']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.show", description=__doc__.splitlines()[0])
    ap.add_argument("--repo", default=".", help="the DVC repository (default: .)")
    ap.add_argument("--run", default=str(Layout().root), help="artifacts directory, relative to --repo (default: artifacts)")
    ap.add_argument("--params", default="params.yaml", help="params file, relative to --repo (default: params.yaml)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = ap.parse_args(argv)
    repo = Path(args.repo)
    try:
        state = collect(repo, repo / args.run, repo / args.params)
    except ParamsError as e:
        print(e, file=sys.stderr)
        return 2
    print(json.dumps(state, indent=2) if args.json else render(state))
    return 0


if __name__ == "__main__":
    sys.exit(main())
