"""Stage index: list the dataset's input files into a manifest (``artifacts/index/manifest.tsv``).

Runs on every ``dvc repro`` (``always_changed``); preprocess depends on the manifest, not on the image
tree, so it reruns only when an input file changed (:mod:`amrg.data.manifest`).
"""

from __future__ import annotations

from amrg.data.manifest import write_manifest

from .common import Timer, start


def main(argv: list[str] | None = None) -> None:
    params, log, layout = start("index", argv)
    timer = Timer()
    n = write_manifest(params.data, layout.manifest)
    log.info("manifest: %d input files of %s listed in %.1fs", n, params.data.dataset, timer())


if __name__ == "__main__":
    main()
