"""``amrg`` command: check params, generate reports for new images. (The state of a DVC workspace:
``python -m flows.show``; the library knows no DVC.)

    amrg check    [--params params.yaml]     validate every key before running anything
    amrg profile  PROFILE [-o FILE] [--base params.yaml]
                                             a profile (configs/paper-*.yaml, configs/official-*.yaml: overlays
                                             of the embedded default, `extends:` chains) as a full, validated
                                             params file (amrg.profiles); stdout without -o
    amrg generate IMAGE [IMAGE ...] [--run artifacts] [--params FILE] [--device auto] [--study]
                  [--cam-dir DIR] [--json]   report, predicted labels, where CAM points and the report
                                             memory's sentences, per image (PNG, JPEG, TIFF, DICOM; --study:
                                             the images are the views of one study); decode and CAM settings
                                             are the run's own (its eval/params.json)
    amrg generate --input DIR|CSV --out FILE.parquet|FILE.jsonl [--batch-size 8]
                                             batch mode (amrg.predict): the model loaded once, studies by folder
                                             or CSV column, resumable, every unreadable study a counted skip
    amrg serve    [--run artifacts] [--host 127.0.0.1] [--port 7860]
                                             a local web page (amrg.serve): upload one or two views, see the
                                             report, labels, CAM overlays and retrieved sentences
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import ParamsError, load_params
from .labels.schema import DECISION_THRESHOLD
from .layout import Layout

def _check(args) -> int:
    try:
        load_params(args.params)
    except ParamsError as e:
        print(e, file=sys.stderr)
        return 2
    print(f"{args.params}: ok")
    return 0


def _profile(args) -> int:
    from .io import write_text
    from .profiles import materialise, render

    try:
        raw, _ = materialise(args.profile, args.base)
    except ParamsError as e:
        print(e, file=sys.stderr)
        return 2
    text = render(args.profile, raw, args.base)
    if args.output:
        write_text(args.output, text)
        print(f"{args.profile} -> {args.output}: ok", file=sys.stderr)
    else:
        print(text, end="")
    return 0


# ------------------------------------------------------------------------------------------ generate
def _fail(msg: str, code: int = 2) -> int:
    """Exit status 2: bad usage or input; 1: the run's artifacts are not built yet."""
    print(f"amrg generate: {msg}", file=sys.stderr)
    return code


def _load(args):
    """(run, params) of ``--run``, or an exit status."""
    from .inference import MissingArtifacts, load_run, run_params
    from .io import resolve_device

    layout = Layout(Path(args.run))
    try:
        params = run_params(layout, args.params)
        return load_run(layout, resolve_device(args.device), params.runtime.precision), params
    except MissingArtifacts as e:
        return _fail(str(e), code=1)
    except ParamsError as e:
        return _fail(str(e))


PHANTOM_NOTE = ("note: this run was trained on PHANTOM images (the embedded default); reports for real X-rays "
                "are not meaningful")


def _generate_batch(args) -> int:
    from .predict import StudyError, generate_batch, studies_from_csv, studies_from_dir

    src = Path(args.input)
    if args.images:
        return _fail("give IMAGE files or --input, not both")
    if not args.out:
        return _fail("--input needs --out FILE.parquet or FILE.jsonl")
    if Path(args.out).suffix not in (".parquet", ".jsonl"):
        return _fail(f"--out must end in .parquet or .jsonl, got {args.out}")
    try:
        if src.is_dir():
            studies = studies_from_dir(src)
        elif src.is_file():
            studies = studies_from_csv(src, args.study_column, args.path_column)
        else:
            return _fail(f"--input {src}: no such folder or CSV file")
    except StudyError as e:
        return _fail(str(e))
    if not studies:
        return _fail(f"--input {src}: no image files found (PNG, JPEG, TIFF, BMP, DICOM)")
    loaded = _load(args)
    if isinstance(loaded, int):
        return loaded
    run, params = loaded
    if run.layout.is_phantom():
        print(PHANTOM_NOTE, file=sys.stderr)
    stats = generate_batch(run, params, studies, Path(args.out), args.batch_size)
    print(json.dumps(stats), file=sys.stderr)
    print(f"{stats['written']} of {stats['studies']} studies have a report in {args.out} "
          f"({stats['already_written']} from an earlier run); {stats['skipped']} skipped"
          + (f": {stats['skip_reasons']}" if stats["skipped"] else ""))
    return 0


def _generate(args) -> int:
    import numpy as np

    from .predict import StudyError, describe, read_study

    if args.input:
        return _generate_batch(args)
    if not args.images:
        return _fail("give IMAGE files, or --input DIR|CSV --out FILE")
    loaded = _load(args)
    if isinstance(loaded, int):
        return loaded
    run, params = loaded
    paths = [Path(p) for p in args.images]
    try:
        if args.study:
            pixels, _ = read_study(paths, run.image_size)
            rows = np.array([[0, min(1, len(pixels) - 1)]])
        else:
            pixels = np.concatenate([read_study([p], run.image_size)[0] for p in paths])
            rows = np.repeat(np.arange(len(pixels))[:, None], 2, 1)
    except StudyError as e:
        if e.reason == "missing_image":
            return _fail(f"image not found: {e.detail}")
        if e.reason == "mixed_studies":
            return _fail(f"--study: {e.detail}")
        return _fail(f"cannot read image {e.detail} ({e.reason}); expected an image file that PIL reads (PNG, "
                     "JPEG, TIFF, ...) or a single-frame DICOM, complete and not truncated")
    phantom = run.layout.is_phantom()
    results = describe(run, pixels, rows, params)
    names = [" + ".join(args.images[:2])] if args.study else args.images
    if args.cam_dir:
        from PIL import Image

        from .labels.schema import label_slug

        for name, r in zip(names, results):
            for c, ov in zip(r["cam"], r["overlays"]):
                dst = Path(args.cam_dir) / f"{Path(args.images[c['image']]).stem}_{label_slug(c['label'])}.png"
                dst.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(ov).save(dst)
                c["overlay"] = str(dst)
    for r in results:
        r.pop("overlays")
    if args.json:
        print(json.dumps([{"images": n, **r, "phantom_trained": phantom} for n, r in zip(names, results)], indent=2))
        return 0
    if phantom:
        print(PHANTOM_NOTE, file=sys.stderr)
    for name, r in zip(names, results):
        print(f"== {name}")
        print(f"predicted labels (p > {DECISION_THRESHOLD}): " + (", ".join(f"{n} {p:.2f}" for n, p in r["predicted"]) or "none"))
        for c in r["cam"]:
            box = c["box"]
            kept = (f"; eq. 1 keeps {c['kept']:.0%} of the patches, box x {box[0]:.2f}-{box[2]:.2f}, y {box[1]:.2f}-{box[3]:.2f}"
                    if box else "; no patch above cam.tau")
            print(f"  {params.cam.method} {c['label']} on {args.images[c['image']]}: {c['where']} of the image "
                  f"(peak x {c['peak'][0]:.2f}, y {c['peak'][1]:.2f}{kept})" + (f" -> {c['overlay']}" if "overlay" in c else ""))
        for label, sents in r["retrieved"].items():
            print(f"  report memory for {label}: " + " | ".join(f"{t} ({w:.2f})" for t, w in sents))
        print(f"report: {r['report_readable']}")
        print(f"report (scoring form): {r['report']}\n")
    return 0


def _serve(args) -> int:
    from .serve import serve

    loaded = _load(args)
    if isinstance(loaded, int):
        return loaded
    run, params = loaded
    return serve(run, params, args.host, args.port, args.max_upload_mb)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="amrg", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, fn, helptext in (("check", _check, "validate params"), ("generate", _generate, "reports for new images"),
                               ("serve", _serve, "a local web page over a trained run")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--params", default=None if name != "check" else "params.yaml",
                       help="params file (generate, serve: default the run's own, written by its evaluate stage)")
        if name != "check":
            p.add_argument("--run", default=str(Layout().root), help="artifacts directory of a trained run (default: artifacts)")
        p.set_defaults(fn=fn)
        if name != "check":
            p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="device (default: auto)")
        if name == "generate":
            p.add_argument("images", nargs="*", metavar="IMAGE", help="image files (PNG, JPEG, TIFF, DICOM, ...)")
            p.add_argument("--study", action="store_true", help="the images are the views of one study (first two used)")
            p.add_argument("--cam-dir", default=None, help="write CAM overlays (PNG) of the predicted diseases here")
            p.add_argument("--json", action="store_true", help="print JSON instead of text")
            p.add_argument("--input", default=None, metavar="DIR|CSV",
                           help="batch mode: a folder (a study per sub-folder, or per file at its top) or a CSV "
                                "with a row per image")
            p.add_argument("--out", default=None, metavar="FILE", help="batch mode: FILE.parquet or FILE.jsonl; a "
                                                                      "rerun skips the studies already written")
            p.add_argument("--study-column", default="study", help="batch CSV: the column grouping images into studies")
            p.add_argument("--path-column", default="path", help="batch CSV: the image path column (relative to the CSV)")
            p.add_argument("--batch-size", type=int, default=8, help="batch mode: studies per device batch")
        if name == "serve":
            p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
            p.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
            p.add_argument("--max-upload-mb", type=float, default=64.0, help="largest upload accepted, in MB")
    p = sub.add_parser("profile", help="a profile as a full params file")
    p.add_argument("profile", help="profile YAML, e.g. configs/official-iu.yaml")
    p.add_argument("-o", "--output", default=None, help="write here (e.g. params.yaml; default: stdout)")
    p.add_argument("--base", default="params.yaml",
                   help="the embedded default the profile overlays (default: params.yaml)")
    p.set_defaults(fn=_profile)
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
