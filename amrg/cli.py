"""``amrg`` command: check params, generate reports for new images. (The state of a DVC workspace:
``python -m flows.show``; the library knows no DVC.)

    amrg check    [--params params.yaml]     validate every key before running anything
    amrg profile  PROFILE [-o FILE] [--base params.yaml]
                                             a profile (configs/paper-*.yaml, configs/official-*.yaml: overlays
                                             of the embedded default, `extends:` chains) as a full, validated
                                             params file (amrg.profiles); stdout without -o
    amrg generate IMAGE [IMAGE ...] [--run artifacts] [--params FILE] [--device auto] [--study]
                  [--cam-dir DIR] [--json]   report, predicted labels and where CAM points, per image
                                             (--study: the images are the views of one study); decode
                                             and CAM settings are the run's own (its eval/params.json)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import Params, ParamsError, load_params
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


def _decode(paths: list[str], size: int):
    """Decode like preprocess does (amrg.data.images): grayscale uint8, resized to the run's image size."""
    import numpy as np

    from .data.images import ImageError, decode_image

    out = []
    for p in map(Path, paths):
        if not p.is_file():
            raise ValueError(f"image not found: {p}" + (" (a directory)" if p.is_dir() else ""))
        try:
            out.append(decode_image(p.resolve().parent, p.name, size))
        except ImageError as e:
            raise ValueError(f"cannot read image {p}: {e.detail} ({e.reason}); expected an image file that "
                             f"PIL reads (PNG, JPEG, TIFF, ...), complete and not truncated") from e
    return np.stack(out)


def describe(run, pixels, view_rows, params: Params, batch_size: int = 8) -> list[dict]:
    """Per study: the generated report, the classifier's labels above the decision threshold and where each predicted
    disease's CAM points (:meth:`amrg.inference.Run.explain`); overlays as RGB arrays under ``"overlays"``."""
    import numpy as np
    import torch

    from .cam import heat_overlay
    from .inference import predicted, study_probabilities
    from .labels.schema import CHEXPERT_14

    x = torch.from_numpy(pixels)
    f, fd = run.features(x, view_rows, batch_size)
    reports = run.generate(f, fd, params.decode, batch_size)
    probs = study_probabilities(run.probabilities(x, np.arange(len(pixels)), batch_size), np.arange(len(pixels)), view_rows)
    cams = run.explain(x, view_rows, probs, params.cam, batch_size)
    out = []
    for s in range(len(view_rows)):
        overlays = [heat_overlay(pixels[c["image"]], c.pop("map")) for c in cams[s]]
        for c in cams[s]:
            c.pop("disease")
        out.append({"report": reports[s], "predicted": [(CHEXPERT_14[d], p) for d, p in predicted(probs[s])],
                    "cam": cams[s], "overlays": overlays})
    return out


def _generate(args) -> int:
    import numpy as np

    from .inference import MissingArtifacts, load_run, run_params
    from .io import resolve_device
    from .layout import Layout

    layout = Layout(Path(args.run))
    try:
        params = run_params(layout, args.params)
        run = load_run(layout, resolve_device(args.device), params.runtime.precision)
    except MissingArtifacts as e:
        return _fail(str(e), code=1)
    except ParamsError as e:
        return _fail(str(e))
    try:
        pixels = _decode(args.images, run.image_size)
    except ValueError as e:
        return _fail(str(e))
    rows = np.array([[0, min(1, len(pixels) - 1)]]) if args.study else np.repeat(np.arange(len(pixels))[:, None], 2, 1)
    phantom = layout.is_phantom()
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
        print("note: this run was trained on PHANTOM images (the embedded default); reports for real X-rays "
              "are not meaningful", file=sys.stderr)
    for name, r in zip(names, results):
        print(f"== {name}")
        print(f"predicted labels (p > {DECISION_THRESHOLD}): " + (", ".join(f"{n} {p:.2f}" for n, p in r["predicted"]) or "none"))
        for c in r["cam"]:
            box = c["box"]
            kept = (f"; eq. 1 keeps {c['kept']:.0%} of the patches, box x {box[0]:.2f}-{box[2]:.2f}, y {box[1]:.2f}-{box[3]:.2f}"
                    if box else "; no patch above cam.tau")
            print(f"  {params.cam.method} {c['label']} on {args.images[c['image']]}: {c['where']} of the image "
                  f"(peak x {c['peak'][0]:.2f}, y {c['peak'][1]:.2f}{kept})" + (f" -> {c['overlay']}" if "overlay" in c else ""))
        print(f"report: {r['report']}\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="amrg", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, fn, helptext in (("check", _check, "validate params"), ("generate", _generate, "reports for new images")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--params", default=None if name == "generate" else "params.yaml",
                       help="params file (generate: default the run's own, written by its evaluate stage)")
        if name != "check":
            p.add_argument("--run", default=str(Layout().root), help="artifacts directory of a trained run (default: artifacts)")
        p.set_defaults(fn=fn)
        if name == "generate":
            p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, TIFF, ...)")
            p.add_argument("--study", action="store_true", help="the images are the views of one study (first two used)")
            p.add_argument("--cam-dir", default=None, help="write CAM overlays (PNG) of the predicted diseases here")
            p.add_argument("--json", action="store_true", help="print JSON instead of text")
            p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="device (default: auto)")
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
